# The CUDA backend (csrc/cuda/): OPENELM_RT_CUDA = AUTO (on when CMake finds nvcc), ON (nvcc
# required) or OFF. Without it csrc/model/cuda_none.cpp reports the backend unavailable.
# The CUDA runtime is linked statically (CUDA::cudart_static): a CUDA-enabled library or
# wheel loads on a machine without a GPU or driver, where the backend says it is unavailable.
# OPENELM_RT_CUDA_ARCHITECTURES: the default is SASS for sm_90 (H100/H200) and PTX for
# compute_80, which the driver compiles for any newer GPU (A100, L4, ...) at first load.
set(OPENELM_RT_CUDA AUTO CACHE STRING "CUDA backend: AUTO (when nvcc is found), ON or OFF")
set_property(CACHE OPENELM_RT_CUDA PROPERTY STRINGS AUTO ON OFF)
set(OPENELM_RT_CUDA_ARCHITECTURES "90-real;80-virtual" CACHE STRING
    "CUDA architectures of the backend's kernels (CMAKE_CUDA_ARCHITECTURES syntax)")

string(TOUPPER "${OPENELM_RT_CUDA}" _oelm_cuda)
set(OPENELM_RT_WITH_CUDA OFF)
if(_oelm_cuda STREQUAL "ON")
  set(OPENELM_RT_WITH_CUDA ON)
elseif(_oelm_cuda STREQUAL "AUTO" AND CMAKE_CROSSCOMPILING)
  message(STATUS "openelm_rt: cross-compiling; building without the CUDA backend (OPENELM_RT_CUDA=ON forces it)")
elseif(_oelm_cuda STREQUAL "AUTO")
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(OPENELM_RT_WITH_CUDA ON)
  else()
    message(STATUS "openelm_rt: no CUDA compiler found; building without the CUDA backend")
  endif()
elseif(NOT _oelm_cuda STREQUAL "OFF")
  message(FATAL_ERROR "OPENELM_RT_CUDA must be AUTO, ON or OFF, got '${OPENELM_RT_CUDA}'")
endif()

if(OPENELM_RT_WITH_CUDA)
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
    set(CMAKE_CUDA_ARCHITECTURES ${OPENELM_RT_CUDA_ARCHITECTURES})
  endif()
  enable_language(CUDA)
  find_package(CUDAToolkit REQUIRED)
  set(CMAKE_CUDA_STANDARD 17)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  target_sources(openelm_rt_core PRIVATE csrc/cuda/cuda_kernels.cu csrc/cuda/executor_cuda.cpp)
  target_link_libraries(openelm_rt_core PUBLIC CUDA::cudart_static)
  # (The target exists already, so its CUDA_ARCHITECTURES is set here, not inherited.)
  set_target_properties(openelm_rt_core PROPERTIES CUDA_VISIBILITY_PRESET hidden
                        CUDA_ARCHITECTURES "${CMAKE_CUDA_ARCHITECTURES}")
  target_compile_definitions(openelm_rt_core PUBLIC OELM_HAVE_CUDA=1)
  message(STATUS "openelm_rt: CUDA backend on (nvcc ${CMAKE_CUDA_COMPILER_VERSION}, "
                 "architectures ${CMAKE_CUDA_ARCHITECTURES})")
else()
  target_sources(openelm_rt_core PRIVATE csrc/model/cuda_none.cpp)
endif()
