// Helpers shared between op files (C++ linkage, not part of the C API).
#pragma once
#include "common.cuh"

// Row softmax of inp * scale over N rows of C (out may equal inp).
af_status af_softmax_rows(af_cuda_context *ctx, float *out, const float *inp, int64_t N, int C,
                          float scale);
// dinp = (accumulate ? dinp : 0) + out * (dout - rowsum(dout * out)); dinp may equal dout
// when accumulate == 0.
af_status af_softmax_rows_backward(af_cuda_context *ctx, float *dinp, const float *dout,
                                   const float *out, int64_t N, int C, int accumulate);
// Weight normalisation of K rows of C (wn_linear.cu): w_eff = v / ||v||, vnorm = ||v||.
af_status af_wn_normalise_rows(af_cuda_context *ctx, float *w_eff, float *vnorm, const float *v,
                               int K, int C);
// The dv of af_wn_linear_backward from G = dL/dw_eff [K,C]: dv += (G - w_eff (G . w_eff)) / vnorm.
af_status af_wn_dv_rows(af_cuda_context *ctx, float *dv, const float *G, const float *w_eff,
                        const float *vnorm, int K, int C);
