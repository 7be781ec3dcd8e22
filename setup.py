from setuptools import find_packages, setup

setup(
    name="keras-ewc",
    version="0.1.0",
    description="Elastic Weight Consolidation for Keras 3: continual learning with model.fit",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["keras_ewc", "keras_ewc.*"]),
    include_package_data=True,
    package_data={"keras_ewc": ["data/*.npz", "data/*.txt", "data/LICENSE*"]},
    install_requires=[
        "tensorflow>=2.16,<2.22",
        "keras>=3.3,<3.16",
        "numpy>=1.26",
    ],
    extras_require={
        "test": ["pytest>=8", "tensorflow-datasets>=4.9", "matplotlib>=3.7", "ruff>=0.5"],
        "examples": ["tensorflow-datasets>=4.9", "matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["keras-ewc=keras_ewc.cli:main"]},
)
