/* afire C API: status codes and the per-thread error message.
 *
 * Every public C function returns an af_status. On failure it has written a
 * message with af_error(); the Python binding turns (status, message) into the
 * matching exception (see py_util.c). Library code never calls exit/abort.
 *
 * Dimension letters: one meaning each, in every file of csrc/core, csrc/ops and cuda/ (in
 * names, comments and shapes such as [B,T,D]); other files point here.
 *   B   images in a batch                 S   image side               P   patch side
 *   C   in_chans, image channels (1 or 3) G   S/P, patch grid side     L   G*G patch tokens
 *   T   L + 1 tokens with cls             Q   P*P*C values per patch (any order: MAE's
 *                                             (p, q, c) or a conv weight's (c, p, q))
 *   D   encoder width                     H   encoder heads            hd  width / heads
 *   Dd  decoder width                     Hd  decoder heads
 *   NL  blocks of a stack                 W   its width (D or Dd)      NH  its heads (H, Hd)
 *   R   MLP ratio (hidden R*W)            Hh  head MLP width (1024)    Bn  head bottleneck (256)
 *   K   prototype classes (head output)   NC  classes of a downstream classifier
 *   N   rows of a flattened matrix (B*T, B*L, samples)                 NT  B*L tokens
 *   IC  features in, per row (linear: [N,IC] -> [N,OC]; row-wise ops keep IC); OC features out
 *   PP  P*P mask logits per token (segmenter)                          S2  S*S pixels
 *   LW, LH  width, height of a synthetic lesion box (the paper's W, H, Eq. 2-3)
 * The paper's prototype matrix C [L,K] is `protos` in code. GEMM helpers keep BLAS's own
 * operand names (M, N, K; A, B, C), which name GEMM positions, not the sizes above.
 */
#ifndef AFIRE_H
#define AFIRE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    AF_OK = 0,
    AF_EINVAL = 1,     /* bad value or shape            -> ValueError          */
    AF_ETYPE = 2,      /* bad dtype / kind of object    -> TypeError           */
    AF_ENOMEM = 3,     /* allocation failed or too big  -> MemoryError         */
    AF_EIO = 4,        /* file system error             -> OSError             */
    AF_EFORMAT = 5,    /* malformed file contents       -> ValueError          */
    AF_ENOTSUP = 6,    /* not available in this build   -> RuntimeError        */
    AF_ENONFINITE = 7, /* NaN/Inf met                   -> FloatingPointError  */
    AF_EBUSY = 8,      /* object in use by another call -> RuntimeError        */
    AF_ECUDA = 9,      /* CUDA / cuBLAS / cuDNN failure -> RuntimeError        */
    AF_EINTERNAL = 10, /* a bug in afire                -> RuntimeError        */
    AF_ECOMM = 11      /* MPI/NCCL failed, a rank died  -> RuntimeError        */
} af_status;

/* Records a message for this thread and returns `status` (printf format). */
af_status af_error(af_status status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
/* The message of the last af_error() on this thread ("" if none). */
const char *af_last_error(void);
void af_clear_error(void);

#ifdef __cplusplus
}
#endif
#endif
