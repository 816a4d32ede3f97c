# Warning and optimisation flags shared by every target.
# No -march=native: one binary must run on every x86-64 / aarch64 CPU; faster
# instruction sets are chosen at run time by the kernel dispatch, not at build time.
function(openelm_rt_set_warnings target)
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    # C and C++ only: nvcc takes its own flags (cmake/Cuda.cmake).
    target_compile_options(${target} PRIVATE
      "$<$<COMPILE_LANGUAGE:C,CXX>:-Wall;-Wextra;-Wno-unused-parameter;$<$<CONFIG:Release>:-O3>>")
  endif()
endfunction()
