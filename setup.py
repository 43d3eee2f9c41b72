"""The one compiled part: the fast engine's AVX2 int8 kernel (enclave/_int8mm.c).

Everything else is in pyproject.toml. The extension is optional: where it cannot be built (no
compiler), the fast engine uses torch's fbgemm kernels instead and says so when it loads.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "enclave._int8mm",
            ["enclave/_int8mm.c"],
            extra_compile_args=["-O3", "-std=c11", "-pthread"],
            extra_link_args=["-pthread"],
            optional=True,
        )
    ]
)
