"""Build afire._C from csrc/ (C11 + OpenMP + OpenBLAS) and, when nvcc is found, cuda/.

Environment switches:
  AFIRE_CUDA=0|1        force the CUDA backend off/on (default: on when nvcc is found)
  AFIRE_CUDA_ARCH=90    semicolon list of SM versions to compile for (default "80;90")
  AFIRE_SANITIZE=1      build with AddressSanitizer + UndefinedBehaviorSanitizer
  AFIRE_DEBUG=1         -O0 -g
"""
import glob
import os
import shutil
import subprocess
import sys

import numpy as np
import scipy_openblas32 as openblas
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


def env_flag(name, default=None):
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    return v.strip().lower() in ("1", "true", "yes", "on")


def find_nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc is None and os.path.exists("/usr/local/cuda/bin/nvcc"):
        nvcc = "/usr/local/cuda/bin/nvcc"
    return nvcc


NVCC = find_nvcc()
USE_CUDA = env_flag("AFIRE_CUDA", NVCC is not None)
if USE_CUDA and NVCC is None:
    sys.exit("AFIRE_CUDA=1 but nvcc was not found on PATH or in /usr/local/cuda/bin")
SANITIZE = env_flag("AFIRE_SANITIZE", False)
DEBUG = env_flag("AFIRE_DEBUG", False)
CUDA_HOME = os.path.dirname(os.path.dirname(NVCC)) if NVCC else None

opt = ["-O0", "-g"] if DEBUG or SANITIZE else ["-O3"]
cflags = ["-std=c11", "-fopenmp", "-Wall", "-Wextra", "-Wno-unused-parameter",
          "-Wno-missing-field-initializers", "-fno-strict-aliasing"] + opt
ldflags = ["-fopenmp"]
if SANITIZE:
    san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
    cflags += san + ["-g"]
    ldflags += san

# Layout: csrc/core (the C core, no Python), csrc/ops (CPU kernels), csrc/python (every file
# that includes Python.h: both extensions' bindings), cuda/ (the CUDA twins of core and ops).
# afire._C: the CPU core. afire._C_cuda: the CUDA backend, a separate extension so that
# `import afire` never loads CUDA libraries (they can clash with PyTorch's own copies).
# the first entries are CUDA-only bindings; the rest are files the CUDA extension also needs
CUDA_ONLY = ["csrc/python/py_cuda.c", "csrc/python/py_cuda_module.c",
             "csrc/python/py_cuda_trainer.c", "csrc/python/py_cuda_tensor.c",
             "csrc/python/py_cuda_nccl.c"]
CUDA_BINDING = CUDA_ONLY + ["csrc/core/error.c", "csrc/python/py_util.c", "csrc/core/slm.c",
                             # the op table and its checker, shared with the CPU bindings
                             "csrc/python/py_op.c", "csrc/python/py_op_table.c",
                             # the Trainer methods shared with the CPU binding
                             "csrc/python/py_trainer_common.c",
                             # DLPack export shared with afire._C.Tensor
                             "csrc/python/py_dlpack.c",
                             # MPI (the NCCL id exchange) and the TCP rendezvous; the numpy
                             # arguments of the host collectives, shared with afire._C.comm
                             "csrc/core/comm.c", "csrc/python/py_comm_common.c",
                             # the GPU trainer: config parsing and checks, layouts + init,
                             # schedules
                             "csrc/python/py_trainer_config.c", "csrc/core/trainer_config.c",
                             "csrc/core/params.c", "csrc/ops/sincos.c", "csrc/core/schedule.c"]
sources = sorted(f for f in glob.glob("csrc/core/*.c") + glob.glob("csrc/ops/*.c")
                 + glob.glob("csrc/python/*.c") if f not in CUDA_ONLY)
HEADERS = glob.glob("csrc/core/*.h") + glob.glob("csrc/ops/*.h") + glob.glob("csrc/python/*.h")
macros = [("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION")]
# "ops/ops.h" resolves through csrc; core and python headers by their names
include_dirs = ["csrc", "csrc/core", "csrc/python", "cuda", np.get_include(),
                openblas.get_include_dir()]
library_dirs = [openblas.get_lib_dir()]
# dl: comm.c loads MPI at run time (dlopen lives in libdl before glibc 2.34)
libraries = [openblas.get_library(), "m", "dl"]
cuda_sources = sorted(glob.glob("cuda/*.cu") + glob.glob("cuda/ops/*.cu"))
cuda_include, cuda_libdirs, cuda_libs, cuda_macros = [], [], [], [("AFIRE_HAVE_CUDA", "1")]


def find_cuda_library(header, lib, inc_dirs, lib_dirs):
    """(include dir, library dir, -l name) of an optional CUDA library, or None.

    Looks in the toolkit, the system, and NVIDIA's pip wheels (nvidia/<pkg>/{include,lib}),
    whose libraries carry only versioned names (libcudnn.so.9), linked as -l:name."""
    extra_inc, extra_lib = [], []
    try:
        import nvidia  # the nvidia-* wheels PyTorch installs
        for base in nvidia.__path__:
            for pkg in sorted(os.listdir(base)):
                extra_inc.append(os.path.join(base, pkg, "include"))
                extra_lib.append(os.path.join(base, pkg, "lib"))
    except ImportError:
        pass
    inc = next((d for d in inc_dirs + extra_inc if os.path.exists(os.path.join(d, header))), None)
    if inc is None:
        return None
    for d in lib_dirs + extra_lib:
        if os.path.exists(os.path.join(d, f"lib{lib}.so")):
            return inc, d, lib
        versioned = sorted(glob.glob(os.path.join(d, f"lib{lib}.so.*")))
        if versioned:
            return inc, d, ":" + os.path.basename(versioned[0])
    return None


if USE_CUDA:
    cuda_include.append(os.path.join(CUDA_HOME, "include"))
    for d in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib")):
        p = os.path.join(CUDA_HOME, d)
        if os.path.isdir(p):
            cuda_libdirs.append(p)
    cuda_libs = ["cudart", "cublas", "cublasLt"]
    sys_inc = cuda_include + ["/usr/include", "/usr/local/include", "/usr/include/x86_64-linux-gnu"]
    sys_lib = cuda_libdirs + ["/usr/lib/x86_64-linux-gnu", "/usr/local/lib"]
    for header, lib, macro in (("cudnn.h", "cudnn", "AFIRE_HAVE_CUDNN"),
                               ("nccl.h", "nccl", "AFIRE_HAVE_NCCL")):
        found = find_cuda_library(header, lib, sys_inc, sys_lib)
        if found is None:
            print(f"afire: {header} / lib{lib} not found: building the CUDA backend without it",
                  flush=True)
            continue
        inc, libdir, name = found
        cuda_macros.append((macro, "1"))
        if inc not in cuda_include:
            cuda_include.append(inc)
        if libdir not in cuda_libdirs:
            cuda_libdirs.append(libdir)
        cuda_libs.append(name)


class BuildExt(build_ext):
    """Compiles cuda/*.cu with nvcc and links the objects into afire._C_cuda."""

    def build_extension(self, ext):
        if ext.name == "afire._C_cuda" and cuda_sources:
            archs = os.environ.get("AFIRE_CUDA_ARCH", "80;90").split(";")
            gencode = []
            for a in archs:
                a = a.strip()
                if a:
                    gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
            objdir = os.path.join(self.build_temp, "cuda")
            os.makedirs(objdir, exist_ok=True)
            objs, cmds = [], []
            for src in cuda_sources:
                obj = os.path.join(objdir, src.replace("/", "_") + ".o")
                deps = [src] + glob.glob("cuda/*.cuh") + glob.glob("cuda/*.h") + HEADERS
                if (self.force or not os.path.exists(obj)
                        or max(map(os.path.getmtime, deps)) > os.path.getmtime(obj)):
                    cmds.append([NVCC, "-c", src, "-o", obj, "-std=c++17", "-O3" if not DEBUG else "-G",
                                 "-Xcompiler", "-fPIC", "-Icsrc", "-Icsrc/core", "-Icuda",
                                 "--expt-relaxed-constexpr"]
                                + [f"-I{d}" for d in cuda_include]
                                + [f"-D{k}={v}" for k, v in cuda_macros] + gencode)
                objs.append(obj)
            # nvcc runs are independent: AFIRE_NVCC_JOBS of them at once (default: all cores)
            jobs = int(os.environ.get("AFIRE_NVCC_JOBS", "0") or 0) or os.cpu_count() or 1

            def compile_one(cmd):
                print(" ".join(cmd), flush=True)
                subprocess.check_call(cmd)

            from concurrent.futures import ThreadPoolExecutor
            with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
                list(pool.map(compile_one, cmds))
            ext.extra_objects = list(ext.extra_objects or []) + objs
        super().build_extension(ext)


exts = [Extension(
    "afire._C",
    sources=sources,
    include_dirs=include_dirs,
    define_macros=macros,
    library_dirs=library_dirs,
    libraries=libraries,
    runtime_library_dirs=[openblas.get_lib_dir()],
    extra_compile_args=cflags,
    extra_link_args=ldflags,
    depends=HEADERS,
)]
if USE_CUDA:
    exts.append(Extension(
        "afire._C_cuda",
        sources=CUDA_BINDING,
        include_dirs=include_dirs + cuda_include,
        define_macros=macros + cuda_macros,
        library_dirs=cuda_libdirs,
        runtime_library_dirs=cuda_libdirs,
        libraries=cuda_libs + ["stdc++", "m", "dl"],
        extra_compile_args=cflags,
        extra_link_args=ldflags,
        # the .cu files too, so that editing one relinks the extension
        depends=HEADERS + glob.glob("cuda/*.cuh") + glob.glob("cuda/*.h") + cuda_sources,
    ))

setup(ext_modules=exts, cmdclass={"build_ext": BuildExt})
