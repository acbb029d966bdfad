// linear on the GPU: cuBLAS SGEMM (exact fp32 unless the context allows TF32).
// Row-major X[N,IC] is column-major X^T, so out^T = W * inp^T needs no copies:
//   out[N,OC]     : gemm(T, N) m=OC n=N  k=IC  A=weight(ld IC) B=inp(ld IC)  C=out(ld OC)
//   dinp[N,IC]    = gemm(N, N) m=IC n=N  k=OC  A=weight(ld IC) B=dout(ld OC) C=dinp(ld IC)
//   dweight[OC,IC]+= gemm(N, T) m=IC n=OC k=N   A=inp(ld IC)    B=dout(ld OC) C=dweight(ld IC)
#include "common.cuh"

// out[n, oc] = bias[oc]: the GEMM then adds its product with beta = 1.
__global__ void broadcast_rows_kernel(float *out, const float *bias, int64_t N, int OC) {
    int64_t total = N * OC;
    AF_GRID_STRIDE(int64_t, i, total)
        out[i] = bias[i % OC];
}

extern "C" af_status af_cuda_linear_forward(af_cuda_context *ctx, float *out, const float *inp,
                                            const float *weight, const float *bias, int N,
                                            int IC, int OC) {
    AF_CUDA_CHECK(N > 0 && IC > 0 && OC > 0, "linear_forward: bad sizes N=%d IC=%d OC=%d", N, IC,
                  OC);
    AF_CUDA_CHECK(out && inp && weight, "linear_forward: NULL pointer");
    const float one = 1.0f, zero = 0.0f;
    if (bias != nullptr) {
        broadcast_rows_kernel<<<af_grid_1d((int64_t)N * OC, 256), 256, 0, ctx->stream>>>(
            out, bias, N, OC);
        AF_CUDA_LAUNCHED();
    }
    AF_CUBLAS_TRY(cublasSgemm(ctx->cublas, CUBLAS_OP_T, CUBLAS_OP_N, OC, N, IC, &one, weight, IC,
                              inp, IC, bias != nullptr ? &one : &zero, out, OC));
    return AF_OK;
}

extern "C" af_status af_cuda_linear_backward(af_cuda_context *ctx, float *dinp, float *dweight,
                                             float *dbias, const float *dout, const float *inp,
                                             const float *weight, int N, int IC, int OC) {
    AF_CUDA_CHECK(N > 0 && IC > 0 && OC > 0, "linear_backward: bad sizes N=%d IC=%d OC=%d", N, IC,
                  OC);
    AF_CUDA_CHECK(dout != nullptr, "linear_backward: NULL dout");
    const float one = 1.0f, zero = 0.0f;
    if (dinp != nullptr) {  // written (beta 0): the GEMM is its only writer
        AF_CUDA_CHECK(weight != nullptr, "linear_backward: dinp needs weight");
        AF_CUBLAS_TRY(cublasSgemm(ctx->cublas, CUBLAS_OP_N, CUBLAS_OP_N, IC, N, OC, &one, weight,
                                  IC, dout, OC, &zero, dinp, IC));
    }
    if (dweight != nullptr) {
        AF_CUDA_CHECK(inp != nullptr, "linear_backward: dweight needs inp");
        AF_CUBLAS_TRY(cublasSgemm(ctx->cublas, CUBLAS_OP_N, CUBLAS_OP_T, IC, OC, N, &one, inp, IC,
                                  dout, OC, &one, dweight, IC));
    }
    if (dbias != nullptr) AF_TRY(af_cuda_colsum_accumulate(ctx, dbias, dout, N, OC));
    return AF_OK;
}
