# Cross build for 64-bit Arm Linux with Debian's cross compiler (apt-get install
# g++-aarch64-linux-gnu); run the results with qemu-user (README, "Testing the SIMD
# kernels"; .ci/neon.sh):
#   cmake -S . -B build/aarch64 -DCMAKE_TOOLCHAIN_FILE=cmake/toolchains/aarch64-linux-gnu.cmake \
#         -DOPENELM_RT_PYTHON=OFF -DOPENELM_RT_C_LIBRARY=OFF -DOPENELM_RT_TESTS=OFF
#   cmake --build build/aarch64 --target kernel_check
#   qemu-aarch64 -L /usr/aarch64-linux-gnu build/aarch64/kernel_check
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)
# Lets CMake (and ctest) run target executables through qemu-user.
set(CMAKE_CROSSCOMPILING_EMULATOR qemu-aarch64 -L /usr/aarch64-linux-gnu)
