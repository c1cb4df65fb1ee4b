"""Build the native extensions: the kernels, compiled once per instruction set, and the
tokenizer, compiled once.

    edgelm/_native/kernels.cpp (+ simd.h, kernels.h, threadpool.h, ...)
        -> edgelm._native._kern_scalar   portable, every CPU (also provides cpu_features())
        -> edgelm._native._kern_avx2     x86-64: AVX2 + FMA + F16C
        -> edgelm._native._kern_avx512   x86-64: AVX-512 F/BW/VL/DQ/VNNI (the AVX2 code with wider
                                         flags; its integer dot products use vpdpbusd)
        -> edgelm._native._kern_vnniemu  x86-64 test build: AVX2 flags, the VNNI code paths with
                                         vpdpbusd emulated exactly in AVX2 (never picked at run
                                         time; it tests the VNNI kernels on CPUs without VNNI)
        -> edgelm._native._kern_neon     aarch64
    edgelm/_native/tokenizer.cpp
        -> edgelm._native._tok           SentencePiece-compatible BPE encoder (portable code)

edgelm/backends/native.py picks a kernel module at import from what the CPU supports, so
wheels never use -march=native. The scalar kernels and the tokenizer are required; the other
kernel builds are optional, so an old compiler that lacks a flag costs speed, not the install.

The metadata lives in pyproject.toml; this file only declares the extensions.
"""

from __future__ import annotations

import copy
import os
import platform
from concurrent.futures import ThreadPoolExecutor

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

SRC = "edgelm/_native/kernels.cpp"
TOK_SRC = "edgelm/_native/tokenizer.cpp"
DEPENDS = [f"edgelm/_native/{h}" for h in ("simd.h", "kernels.h", "threadpool.h", "vmath.h", "qd8.h", "ops.h", "fused.h", "block.h")]

# ISA-specific flags, GCC/Clang spelling, then MSVC spelling.
ISA_FLAGS = {
    "scalar": ([], []),
    "avx2": (["-mavx2", "-mfma", "-mf16c"], ["/arch:AVX2"]),
    "avx512": (
        ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mavx512bf16", "-mfma", "-mf16c"],
        ["/arch:AVX512"],
    ),
    "vnniemu": (["-mavx2", "-mfma", "-mf16c"], ["/arch:AVX2"]),
    "neon": ([], []),  # Advanced SIMD is baseline on aarch64
}


def _target_isas() -> list[str]:
    forced = os.environ.get("EDGELM_BUILD_ISAS")  # e.g. "scalar,avx2" to build fewer
    if forced:
        return [s.strip() for s in forced.split(",") if s.strip()]
    m = platform.machine().lower()
    if m in ("x86_64", "amd64", "x64"):
        return ["scalar", "avx2", "avx512", "vnniemu"]
    if m in ("aarch64", "arm64", "armv8l"):
        return ["scalar", "neon"]
    return ["scalar"]


def _extension(isa: str) -> Pybind11Extension:
    macros = [("EDGELM_MODNAME", f"_kern_{isa}"), ("EDGELM_BUILD_ISA", f'"{isa}"')]
    if isa == "scalar":
        macros.append(("EDGELM_FORCE_SCALAR", "1"))
    if isa == "vnniemu":
        macros.append(("EDGELM_VNNI_EMULATE", "1"))
    ext = Pybind11Extension(
        f"edgelm._native._kern_{isa}",
        [SRC],
        depends=DEPENDS,
        define_macros=macros,
        cxx_std=17,
        optional=(isa != "scalar"),
    )
    ext._edgelm_isa = isa
    return ext


def _tokenizer_extension() -> Pybind11Extension:
    ext = Pybind11Extension("edgelm._native._tok", [TOK_SRC], cxx_std=17)
    ext._edgelm_isa = None  # built once, with no instruction-set flags
    return ext


class BuildExt(build_ext):
    """Adds the optimisation / ISA flags for the compiler in use, gives each build its own
    temporary directory (the ISA builds share one source file, so their object files would
    collide), and builds the extensions in parallel."""

    def _flags(self, isa: str | None) -> tuple[list[str], list[str]]:
        gnu, msvc = ISA_FLAGS[isa] if isa else ([], [])
        if self.compiler.compiler_type == "msvc":
            return ["/O2", "/EHsc", *msvc], []
        # -O3, no -ffast-math (kernels must stay IEEE), no -march (wheels run on other CPUs).
        return ["-O3", "-pthread", *gnu], ["-pthread"]

    def _build_one(self, ext) -> None:
        isa = getattr(ext, "_edgelm_isa", "scalar")
        cflags, lflags = self._flags(isa)
        ext.extra_compile_args = list(ext.extra_compile_args or []) + cflags
        ext.extra_link_args = list(ext.extra_link_args or []) + lflags
        cmd = copy.copy(self)  # a private build_temp; everything else shared
        cmd.build_temp = os.path.join(self.build_temp, isa or ext.name.rsplit(".", 1)[-1])
        with self._filter_build_errors(ext):
            build_ext.build_extension(cmd, ext)

    def build_extensions(self) -> None:
        self.check_extensions_list(self.extensions)
        jobs = max(1, min(len(self.extensions), os.cpu_count() or 1))
        if jobs == 1:
            for ext in self.extensions:
                self._build_one(ext)
            return
        with ThreadPoolExecutor(jobs) as pool:
            for f in [pool.submit(self._build_one, ext) for ext in self.extensions]:
                f.result()


setup(
    ext_modules=[_tokenizer_extension(), *(_extension(isa) for isa in _target_isas())],
    cmdclass={"build_ext": BuildExt},
    zip_safe=False,
)
