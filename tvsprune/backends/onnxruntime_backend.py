"""``ort-cpu``, ``ort-cuda``, ``ort-trt``: ONNX Runtime with one execution provider (the GPU ones
need onnxruntime-gpu)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MissingDependencyError, TvsError
from . import Runner, cuda_available, gpu_free_bytes, register


def ort_session(path: str | Path, providers: list[str] | None = None, provider_options: list[dict] | None = None,
                threads: int | None = None, spin: bool = True):
    """An ONNX Runtime session (CPU unless ``providers`` say otherwise); a file ONNX Runtime cannot
    parse or load is a one-line TvsError naming it. ``spin=False``: its worker threads sleep when
    idle instead of spinning (what timing several sessions in turn needs, see OrtRunner)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), so, providers=providers or ["CPUExecutionProvider"],
                                    provider_options=provider_options)
    except Exception as e:
        if type(e).__name__ in ("InvalidProtobuf", "NoSuchFile", "InvalidGraph", "InvalidArgument", "Fail"):
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TvsError(f"{path} is not an ONNX model ONNX Runtime can load: {first}") from None
        raise


class OrtRunner(Runner):
    """ONNX Runtime with a chosen execution provider; records which providers really loaded.

    ``spin`` (default off): whether idle intra-op threads spin. Measurements time several
    sessions in turn (A/B interleaved), and a session's threads keep spinning after its run,
    taking the cores from the next one: ResNet-20 at batch 32 on 2 cores, four sessions in
    turn, p90 18.5 ms and cv 0.39 with spinning, 10.3 ms and cv 0.08 without (median 9.7 ms
    both; one session alone 9.4 ms, cv 0.03).
    """

    PROVIDERS = {"ort-cpu": "CPUExecutionProvider", "ort-cuda": "CUDAExecutionProvider",
                 "ort-trt": "TensorrtExecutionProvider"}

    def __init__(self, artifact: str | Path, backend: str = "ort-cpu", fp16: bool = False,
                 engine_cache: str | None = None, threads: int | None = None, spin: bool = False,
                 **options: Any) -> None:
        super().__init__(artifact, **options)
        self.name, self.fp16, self.engine_cache, self.threads = backend, fp16, engine_cache, threads
        self.spin = spin
        self.device = "cpu" if backend == "ort-cpu" else "cuda"

    def _activate(self) -> None:
        want = self.PROVIDERS[self.name]
        opts: dict[str, Any] = {}
        if self.name == "ort-trt":
            opts = {"trt_fp16_enable": self.fp16, "trt_engine_cache_enable": bool(self.engine_cache)}
            if self.engine_cache:
                opts["trt_engine_cache_path"] = self.engine_cache
        providers = [want] if want == "CPUExecutionProvider" else [want, "CPUExecutionProvider"]
        options = [opts] + ([{}] if len(providers) > 1 else [])
        before = gpu_free_bytes() if self.device == "cuda" else None
        self.sess = ort_session(self.artifact, providers, options, self.threads, self.spin)
        loaded = self.sess.get_providers()
        self.info["providers_loaded"] = loaded
        if want not in loaded:
            raise MissingDependencyError(f"{want} did not load (ONNX Runtime fell back to {loaded}); "
                                         "install onnxruntime-gpu with matching CUDA/TensorRT libraries")
        if before is not None:
            after = gpu_free_bytes()
            if after is not None:
                self.info["gpu_memory_delta_bytes"] = before - after
        inp = self.sess.get_inputs()[0]
        self.input_name = inp.name
        if all(isinstance(d, int) for d in inp.shape[1:]):
            self.input_shape = tuple(inp.shape[1:])
        self.info["threads"] = self.threads or "ort default"
        self.info["spinning"] = self.spin

    def _deactivate(self) -> None:
        del self.sess

    def _infer(self, x: np.ndarray) -> np.ndarray:
        return self.sess.run(None, {self.input_name: x})[0]


def _provider_missing(provider: str, what: str):
    def check() -> str | None:
        try:
            import onnxruntime as ort

            providers = ort.get_available_providers()
        except Exception:
            providers = []
        if provider not in providers:
            return f"{what} not installed"
        return None if cuda_available() else "no GPU"

    return check


register("ort-cpu", "onnx", lambda a, **k: OrtRunner(a, "ort-cpu", **k), order=1)
register("ort-cuda", "onnx", lambda a, **k: OrtRunner(a, "ort-cuda", **k),
         _provider_missing("CUDAExecutionProvider", "onnxruntime-gpu (CUDAExecutionProvider)"), order=4)
register("ort-trt", "onnx", lambda a, **k: OrtRunner(a, "ort-trt", **k),
         _provider_missing("TensorrtExecutionProvider", "onnxruntime-gpu with the TensorRT provider"), order=5)
