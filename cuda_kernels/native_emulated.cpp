// The CUDA twin (native_cuda.cpp with hashgrid.cu, warp.cu and mi.cu) compiled as host C++ in
// one translation unit, with the emulation of cuda_compat.h: CPU tensors, every launch run
// block by block and thread by thread. Loaded by neuralreg/native.py as the "emulated"
// kernels, which the tests run against the PyTorch reference like the other twins.
#define NR_EMULATE_CUDA 1
#include "hashgrid.cu"
#include "warp.cu"
#include "mi.cu"
#include "native_cuda.cpp"
