"""The C part of mmproxy (mmproxy/_splice.c) as a setuptools extension; everything else is
in pyproject.toml. The one definition of how it is built: pip, `make ext` and debian/rules
all come here. A setup.py because Debian 12's setuptools (66) predates the pyproject.toml
form of ext-modules. CFLAGS, CPPFLAGS and LDFLAGS from the environment are added by
setuptools (debian/rules exports dpkg's hardening flags). `optional`: where it cannot be
built (no compiler), pip still installs the rest, so that --version, --help and the
configuration check work, and `mmproxy run` says plainly what is missing."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "mmproxy._splice",
            sources=["mmproxy/_splice.c"],
            optional=True,
            extra_compile_args=[
                "-Wall",
                "-Wextra",
                "-Werror=implicit-function-declaration",
                "-fno-strict-aliasing",
            ],
        )
    ],
)
