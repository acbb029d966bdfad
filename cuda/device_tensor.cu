// Raw device memory behind afire._C_cuda.cuda.DeviceTensor (device_tensor.cuh).
#include "common.cuh"
#include "device_tensor.cuh"

// Makes `device` current for the lifetime of the guard, then restores the caller's device.
struct DeviceGuard {
    int prev = -1;
    cudaError_t err;
    explicit DeviceGuard(int device) {
        err = cudaGetDevice(&prev);
        if (err == cudaSuccess && prev != device) err = cudaSetDevice(device);
        if (err != cudaSuccess) cudaGetLastError();
    }
    ~DeviceGuard() {
        int now = -1;
        if (prev >= 0 && cudaGetDevice(&now) == cudaSuccess && now != prev) cudaSetDevice(prev);
    }
};

extern "C" af_status af_cuda_bytes_alloc(void **out, size_t bytes, int device) {
    *out = nullptr;
    if (bytes == 0) return AF_OK;
    DeviceGuard g(device);
    if (g.err != cudaSuccess)
        return af_error(AF_ECUDA, "cannot select CUDA device %d: %s", device,
                        cudaGetErrorString(g.err));
    void *p = nullptr;
    cudaError_t e = cudaMalloc(&p, bytes);
    if (e != cudaSuccess) {
        cudaGetLastError();
        return af_error(e == cudaErrorMemoryAllocation ? AF_ENOMEM : AF_ECUDA,
                        "cudaMalloc of %zu bytes on device %d failed: %s", bytes, device,
                        cudaGetErrorString(e));
    }
    e = cudaMemset(p, 0, bytes);
    if (e != cudaSuccess) {
        cudaGetLastError();
        cudaFree(p);
        return af_error(AF_ECUDA, "cudaMemset failed: %s", cudaGetErrorString(e));
    }
    *out = p;
    return AF_OK;
}

extern "C" void af_cuda_bytes_free(void *p, int device) {
    if (p == nullptr) return;
    DeviceGuard g(device);
    cudaDeviceSynchronize();
    cudaFree(p);
    cudaGetLastError();  // nothing to report from a destructor; keep the sticky state clean
}

extern "C" af_status af_cuda_bytes_copy(void *dst, const void *src, size_t bytes, int kind,
                                        int device) {
    if (bytes == 0) return AF_OK;
    AF_CUDA_CHECK(kind == AF_COPY_H2D || kind == AF_COPY_D2H || kind == AF_COPY_D2D,
                  "bad copy kind %d", kind);
    DeviceGuard g(device);
    if (g.err != cudaSuccess)
        return af_error(AF_ECUDA, "cannot select CUDA device %d: %s", device,
                        cudaGetErrorString(g.err));
    static const cudaMemcpyKind kinds[] = {cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost,
                                           cudaMemcpyDeviceToDevice};
    if (kind != AF_COPY_H2D) AF_CUDA_TRY(cudaDeviceSynchronize());
    AF_CUDA_TRY(cudaMemcpy(dst, src, bytes, kinds[kind]));
    // cudaMemcpy from pageable memory may return before the device has the data
    AF_CUDA_TRY(cudaDeviceSynchronize());
    return AF_OK;
}
