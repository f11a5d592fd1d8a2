// Qualifiers for helpers shared by the CUDA kernels (.cu, device code) and the CPU kernels (.cpp).
#pragma once

#ifdef __CUDACC__
#define SF_HOST_DEVICE __host__ __device__
#define SF_INLINE __forceinline__
#else
#define SF_HOST_DEVICE
#define SF_INLINE inline
#endif
