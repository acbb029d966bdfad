// linear on the GPU: cuBLAS SGEMM (exact fp32 unless the context allows TF32).
// Row-major X[N,C] is column-major X^T, so out^T = W * inp^T needs no copies:
//   out[N,OC]    : gemm(T, N) m=OC n=N  k=C   A=weight(ld C) B=inp(ld C)   C=out(ld OC)
//   dinp[N,C]   += gemm(N, N) m=C  n=N  k=OC  A=weight(ld C) B=dout(ld OC) C=dinp(ld C)
//   dweight[OC,C]+= gemm(N, T) m=C  n=OC k=N   A=inp(ld C)    B=dout(ld OC) C=dweight(ld C)
#include "common.cuh"

// out[n, oc] = bias[oc]: the GEMM then adds its product with beta = 1.
__global__ void broadcast_rows_kernel(float *out, const float *bias, int64_t N, int OC) {
    int64_t total = N * OC;
    AF_GRID_STRIDE(int64_t, i, total)
        out[i] = bias[i % OC];
}

extern "C" af_status af_cuda_linear_forward(af_cuda_context *ctx, float *out, const float *inp,
                                            const float *weight, const float *bias, int N,
                                            int C, int OC) {
    AF_CUDA_CHECK(N > 0 && C > 0 && OC > 0, "linear_forward: bad sizes N=%d C=%d OC=%d", N, C, OC);
    AF_CUDA_CHECK(out && inp && weight, "linear_forward: NULL pointer");
    const float one = 1.0f, zero = 0.0f;
    if (bias != nullptr) {
        broadcast_rows_kernel<<<af_grid_1d((int64_t)N * OC, 256), 256, 0, ctx->stream>>>(
            out, bias, N, OC);
        AF_CUDA_LAUNCHED();
    }
    AF_CUBLAS_TRY(cublasSgemm(ctx->cublas, CUBLAS_OP_T, CUBLAS_OP_N, OC, N, C, &one, weight, C,
                              inp, C, bias != nullptr ? &one : &zero, out, OC));
    return AF_OK;
}

extern "C" af_status af_cuda_linear_backward(af_cuda_context *ctx, float *dinp, float *dweight,
                                             float *dbias, const float *dout, const float *inp,
                                             const float *weight, int N, int C, int OC) {
    AF_CUDA_CHECK(N > 0 && C > 0 && OC > 0, "linear_backward: bad sizes N=%d C=%d OC=%d", N, C, OC);
    AF_CUDA_CHECK(dout != nullptr, "linear_backward: NULL dout");
    const float one = 1.0f;
    if (dinp != nullptr) {
        AF_CUDA_CHECK(weight != nullptr, "linear_backward: dinp needs weight");
        AF_CUBLAS_TRY(cublasSgemm(ctx->cublas, CUBLAS_OP_N, CUBLAS_OP_N, C, N, OC, &one, weight,
                                  C, dout, OC, &one, dinp, C));
    }
    if (dweight != nullptr) {
        AF_CUDA_CHECK(inp != nullptr, "linear_backward: dweight needs inp");
        AF_CUBLAS_TRY(cublasSgemm(ctx->cublas, CUBLAS_OP_N, CUBLAS_OP_T, C, OC, N, &one, inp, C,
                                  dout, OC, &one, dweight, C));
    }
    if (dbias != nullptr) AF_TRY(af_cuda_colsum_accumulate(ctx, dbias, dout, N, OC));
    return AF_OK;
}
