# Cross-compiling for 32-bit ARM Linux, hard float (Debian: g++-arm-linux-gnueabihf, or
# crossbuild-essential-armhf). edgeprune passes the -march value (the target's cpu_flags) as
# GGML_CPU_ARM_ARCH; ggml's 32-bit NEON kernels also need -mfpu=neon-fp-armv8 (set below).
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR armv7l)

set(CMAKE_C_COMPILER arm-linux-gnueabihf-gcc)
set(CMAKE_CXX_COMPILER arm-linux-gnueabihf-g++)
set(CMAKE_C_FLAGS_INIT "-mfpu=neon-fp-armv8 -mfp16-format=ieee")
set(CMAKE_CXX_FLAGS_INIT "-mfpu=neon-fp-armv8 -mfp16-format=ieee")

set(CMAKE_FIND_ROOT_PATH /usr/arm-linux-gnueabihf)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)
