// Helpers shared between op files (C++ linkage, not part of the C API).
#pragma once
#include "common.cuh"

// Row softmax of inp * scale over N rows of IC (out may equal inp).
af_status af_softmax_rows(af_cuda_context *ctx, float *out, const float *inp, int64_t N, int IC,
                          float scale);
// dinp = out * (dout - rowsum(dout * out)), written; dinp may equal dout.
af_status af_softmax_rows_backward(af_cuda_context *ctx, float *dinp, const float *dout,
                                   const float *out, int64_t N, int IC);
// Weight normalisation of OC rows of IC (wn_linear.cu): w_eff = v / ||v||, vnorm = ||v||.
af_status af_wn_normalise_rows(af_cuda_context *ctx, float *w_eff, float *vnorm, const float *v,
                               int OC, int IC);
// The dv of af_wn_linear_backward from dw_eff = dL/dw_eff [OC,IC]:
// dv += (dw_eff - w_eff (dw_eff . w_eff)) / vnorm, row by row.
af_status af_wn_dv_rows(af_cuda_context *ctx, float *dv, const float *dw_eff, const float *w_eff,
                        const float *vnorm, int OC, int IC);
