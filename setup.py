"""
Packaging for txfractal: a Twisted framework for fractal application servers.
"""

from setuptools import find_packages, setup

with open("README.rst", encoding="utf-8") as f:
    longDescription = f.read()

setup(
    name="txfractal",
    version="0.1.0.dev0",
    description="Fractal application servers on Twisted: per-user SQLite object stores, routed over AMP.",
    long_description=longDescription,
    long_description_content_type="text/x-rst",
    license="MIT",
    python_requires=">=3.11",
    # An explicit root makes "pip install -e ." put this directory on sys.path
    # (a static .pth) rather than install an import hook, so that Twisted's
    # plugin search finds twisted/plugins/fractal_plugin.py.
    package_dir={"": "."},
    packages=find_packages(include=["fractal", "fractal.*"]) + ["twisted.plugins"],
    package_data={"fractal": ["py.typed"], "twisted.plugins": ["fractal_plugin.py"]},
    install_requires=[
        "Twisted[conch,tls]>=24.7.0",
        "zope.interface>=6.0",
        "Epsilon>=0.8.0",
        "attrs>=23.1.0",
        "Automat>=24.8.0",
        "psycopg[binary]>=3.1",
        "cryptography>=42.0",
        # ISA-L's zlib-format compression: durable records several times
        # faster than the standard library's (fractal.durable.record).
        "isal>=1.6",
    ],
    extras_require={
        "test": ["hypothesis>=6.100"],
        "dev": [
            "hypothesis>=6.100",
            "mypy>=1.10",
            "mypy-zope>=1.0.5",
            "ruff>=0.5",
            "pyflakes>=3.2",
            "sphinx>=7.3",
            "towncrier>=23.11",
            "tox>=4.11",
        ],
    },
    entry_points={"console_scripts": ["fractal = fractal._cli:main"]},
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.11",
    ],
)
