"""Build the keras-dfp custom-op library with the flags of the installed TensorFlow.

`pip install --no-build-isolation .` compiles every tf_ops/cc/**/*.cc with g++ (or
$CXX) into keras_dfp/_keras_dfp_ops.so; `pip install --no-build-isolation -e .`
puts the library in the source tree. The only flags are those returned by
tf.sysconfig.get_compile_flags() / get_link_flags() plus -O3 -fPIC -shared, so the
library matches the ABI of the TensorFlow it is built against. Next to the library
the build writes _keras_dfp_ops.build_info.json, which keras_dfp/_loader.py
compares with tf.__version__ before loading.
"""

import concurrent.futures
import json
import os
import pathlib
import shlex
import subprocess

import setuptools
from setuptools.command.build_ext import build_ext

ROOT = pathlib.Path(__file__).resolve().parent
SOURCE_DIR = ROOT / "tf_ops" / "cc"
EXTENSION_NAME = "keras_dfp._keras_dfp_ops"
BUILD_INFO_SUFFIX = ".build_info.json"


def _tensorflow_flags():
    """Return (version, compile_flags, link_flags) of the installed TensorFlow."""
    # Imported here so that `setup.py --version` and metadata queries work
    # without TensorFlow.
    import tensorflow as tf

    return (
        tf.__version__,
        list(tf.sysconfig.get_compile_flags()),
        list(tf.sysconfig.get_link_flags()),
    )


def _run(command):
    """Run a compiler command and raise with its output if it fails."""
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"Compiler command failed with exit code {result.returncode}: "
            f"{shlex.join(command)}\n{result.stdout}{result.stderr}"
        )


class BuildTensorFlowOps(build_ext):
    """Compile the custom-op library with g++ instead of distutils' compiler."""

    def get_ext_filename(self, fullname):
        # tf.load_op_library needs a plain shared object, not a Python module
        # with an ABI tag in its name.
        return os.path.join(*fullname.split(".")) + ".so"

    def get_outputs(self):
        outputs = super().get_outputs()
        return outputs + [_build_info_path(path) for path in outputs]

    def get_output_mapping(self):
        mapping = super().get_output_mapping()
        for output, source in list(mapping.items()):
            mapping[_build_info_path(output)] = _build_info_path(source)
        return mapping

    def copy_extensions_to_source(self):
        # Editable installs build into a temporary directory and copy only the
        # library into the source tree; its build record has to follow it.
        super().copy_extensions_to_source()
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
            self.copy_file(_build_info_path(regular_file), _build_info_path(inplace_file))

    def build_extension(self, ext):
        library = pathlib.Path(self.get_ext_fullpath(ext.name)).resolve()
        library.parent.mkdir(parents=True, exist_ok=True)
        object_dir = pathlib.Path(self.build_temp).resolve() / "tf_ops"
        version, compile_flags, link_flags = _tensorflow_flags()
        compiler = shlex.split(os.environ.get("CXX", "g++"))
        compile_command = compiler + ["-O3", "-fPIC", f"-I{ROOT}"] + compile_flags

        headers = sorted(SOURCE_DIR.rglob("*.h"))
        newest_header = max((path.stat().st_mtime for path in headers), default=0.0)

        # Objects compiled for another TensorFlow (other headers or flags) must
        # not be reused, so a stamp of the compile command guards the cache.
        object_dir.mkdir(parents=True, exist_ok=True)
        stamp_path = object_dir / "compile_command.json"
        stamp = json.dumps({"tensorflow_version": version, "command": compile_command})
        stale = (
            self.force
            or not stamp_path.exists()
            or stamp_path.read_text(encoding="utf-8") != stamp
        )
        jobs = []
        objects = []
        for source in ext.sources:
            source_path = ROOT / source
            relative = source_path.relative_to(SOURCE_DIR).with_suffix(".o")
            obj = object_dir / relative
            obj.parent.mkdir(parents=True, exist_ok=True)
            objects.append(obj)
            newest_input = max(source_path.stat().st_mtime, newest_header)
            if stale or not obj.exists() or obj.stat().st_mtime < newest_input:
                jobs.append(compile_command + ["-c", str(source_path), "-o", str(obj)])

        workers = max(1, min(len(jobs), os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            for future in [pool.submit(_run, job) for job in jobs]:
                future.result()
        stamp_path.write_text(stamp, encoding="utf-8")

        _run(
            compiler
            + ["-shared", "-o", str(library)]
            + [str(obj) for obj in objects]
            + link_flags
        )
        build_info = {
            "tensorflow_version": version,
            "compiler": compiler,
            "compile_flags": ["-O3", "-fPIC"] + compile_flags,
            "link_flags": ["-shared"] + link_flags,
        }
        pathlib.Path(_build_info_path(str(library))).write_text(
            json.dumps(build_info, indent=2) + "\n", encoding="utf-8"
        )


def _build_info_path(library_path):
    """Return the build-info JSON path that belongs to a library path."""
    return str(library_path).removesuffix(".so") + BUILD_INFO_SUFFIX


SOURCES = sorted(str(path.relative_to(ROOT)) for path in SOURCE_DIR.rglob("*.cc"))

setuptools.setup(
    ext_modules=[setuptools.Extension(EXTENSION_NAME, sources=SOURCES)],
    cmdclass={"build_ext": BuildTensorFlowOps},
)
