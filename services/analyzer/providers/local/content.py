"""The ``content`` profile's models: text (OCR) and NSFW detection on the analysis image.

Both run on onnxruntime, from ONNX files shipped inside their wheels (nothing is
downloaded, at install or at run time):

* OCR: ``rapidocr-onnxruntime`` — PP-OCRv4 text detection and recognition, and the PP-OCR
  mobile direction classifier (upside-down lines), from PaddleOCR.
* NSFW: ``nudenet`` — its ``320n.onnx`` detector of 18 body-part classes (exposed or
  covered); an image is ``nsfw`` when an *exposed* intimate part scores at least the
  threshold.

``ContentModels`` loads them once (seconds, and a few hundred MB) and then reads image
after image. The analyzer runs them in worker processes (``ModelPool``): one
``ContentModels`` per process, built by the pool's initializer, so an item pays only for
its own inference. onnxruntime sizes its thread pools to the machine by default; N
processes doing that would run N x cores threads on the cores, so every session gets
``threads`` intra-op threads and one inter-op thread.
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import partial
from importlib import util
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont

from imagestream.common import pools
from imagestream.common.errors import ErrorClass, ItemError
from imagestream.common.messages import ImageFacts

from . import facts as local

log = logging.getLogger(__name__)

_NUMBER: Final = {"type": "number"}
_POINT: Final = {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2}
#: The fields ``content`` adds to the facts, with the JSON Schema of their values.
SCHEMA: Final[dict[str, dict[str, Any]]] = {
    # Recognized lines, top to bottom, joined by newlines ("" when there is none).
    "text": {"type": "string"},
    "text_lines": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {
                "text": {"type": "string"},
                "confidence": _NUMBER,
                # The line's four corners (clockwise from top left) in the original
                # image's pixels.
                "box": {"type": "array", "items": _POINT, "minItems": 4, "maxItems": 4},
            },
            "required": ["text", "confidence", "box"],
        },
    },
    # The lines' confidences averaged, weighted by their lengths (null without text).
    "text_confidence": {"type": ["number", "null"]},
    "has_text": {"type": "boolean"},
    # Every body-part class the detector found, with its best score, highest first.
    "nsfw_labels": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"label": {"type": "string"}, "score": _NUMBER},
            "required": ["label", "score"],
        },
    },
    # The best score of an exposed intimate part (0 when none was found).
    "nsfw_score": _NUMBER,
    "nsfw": {"type": "boolean"},
}

#: nudenet's classes that make an image unsafe for work; the others (faces, feet, belly,
#: armpits, a male chest, anything covered) are reported in ``nsfw_labels`` only.
UNSAFE_LABELS: Final = frozenset(
    {
        "FEMALE_GENITALIA_EXPOSED",
        "FEMALE_BREAST_EXPOSED",
        "MALE_GENITALIA_EXPOSED",
        "BUTTOCKS_EXPOSED",
        "ANUS_EXPOSED",
    }
)
#: A line of a single character is kept only from this confidence up: on photographs
#: without text, PP-OCR reads a lone character into texture now and then (on skimage's
#: photos: an "O" in chelsea's fur at 0.53, a "6" among the coins at 0.59), while lines of
#: real text score 0.9 and more (bench/ocr_long_side.py's words, skimage's page).
LONE_CHARACTER_CONFIDENCE: Final = 0.8
#: The side nudenet's 320n model was trained at (its input is this square).
NSFW_RESOLUTION: Final = 320


@dataclass(frozen=True, slots=True)
class ModelFile:
    name: str
    path: Path


@functools.cache
def model_files() -> tuple[ModelFile, ...]:
    """Every model file the content profile loads, in its installed package (doctor shows
    a row for each)."""
    ocr, nsfw = _package_dir("rapidocr_onnxruntime") / "models", _package_dir("nudenet")
    return (
        ModelFile("ocr text detection", ocr / "ch_PP-OCRv4_det_infer.onnx"),
        ModelFile("ocr recognition", ocr / "ch_PP-OCRv4_rec_infer.onnx"),
        ModelFile("ocr line direction", ocr / "ch_ppocr_mobile_v2.0_cls_infer.onnx"),
        ModelFile("nsfw detector", nsfw / "320n.onnx"),
    )


def _package_dir(name: str) -> Path:
    # find_spec locates a package without importing it (onnxruntime takes a second).
    spec = util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ModelError(f"the {name} package is not installed")
    return Path(spec.origin).parent


class ModelError(Exception):
    """A model file is missing or cannot be loaded: the analyzer cannot serve ``content``."""


def check_model(model: ModelFile) -> str:
    """Load one model file in an onnxruntime session; its one-line description, or
    ModelError saying what is wrong."""
    import onnxruntime as ort

    path = _present(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    try:
        ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf types
        raise ModelError(f"{model.name}: {path} cannot be loaded: {_one_line(exc)}") from None
    return f"{path} ({path.stat().st_size / 1e6:.1f} MB) loads"


def _present(model: ModelFile) -> Path:
    if not model.path.is_file():
        raise ModelError(f"{model.name}: {model.path} is missing")
    return model.path


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


class ContentModels:
    """The OCR and NSFW models of one process, loaded once."""

    def __init__(self, threads: int, nsfw_threshold: float) -> None:
        import onnxruntime as ort
        from nudenet import NudeDetector
        from rapidocr_onnxruntime import RapidOCR

        files = model_files()
        for model in files:
            _present(model)
        ort.set_default_logger_severity(3)  # its warnings are about graph fusion, not us
        self.nsfw_threshold = nsfw_threshold
        try:
            # rapidocr passes these to every session it makes (det, cls, rec).
            self.ocr = RapidOCR(intra_op_num_threads=threads, inter_op_num_threads=1)
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            self.nsfw = NudeDetector.__new__(NudeDetector)
            # NudeDetector.__init__ makes a session with onnxruntime's default threads (one
            # per core) and takes no options: the same attributes, set with a bounded one.
            self.nsfw.onnx_session = ort.InferenceSession(
                str(files[-1].path), sess_options=options, providers=["CPUExecutionProvider"]
            )
            self.nsfw.input_name = self.nsfw.onnx_session.get_inputs()[0].name
            self.nsfw.input_width = self.nsfw.input_height = NSFW_RESOLUTION
        except Exception as exc:
            raise ModelError(f"the content models cannot be loaded: {_one_line(exc)}") from None

    def warm_up(self) -> None:
        """Run every model once: onnxruntime's first run of a session allocates and plans
        (about 3 s for the OCR here), which belongs to the start, not to an item."""
        image = Image.new("RGB", (320, 96), (250, 250, 250))
        font = ImageFont.load_default(size=40)
        ImageDraw.Draw(image).text((12, 24), "warm up", font=font, fill=(0, 0, 0))
        self.read(np.ascontiguousarray(np.asarray(image)[:, :, ::-1]), 1.0, 1.0)

    def read(self, bgr: npt.NDArray[np.uint8], scale_x: float, scale_y: float) -> dict[str, Any]:
        """The content fields of one image (BGR, as both libraries read files); boxes are
        scaled by ``scale_x``/``scale_y`` into the original image's pixels."""
        lines, _ = self.ocr(bgr)
        detections: list[dict[str, Any]] = self.nsfw.detect(bgr)
        return content_fields(lines or [], detections, scale_x, scale_y, self.nsfw_threshold)


def content_fields(
    lines: list[list[Any]],
    detections: list[dict[str, Any]],
    scale_x: float,
    scale_y: float,
    nsfw_threshold: float,
) -> dict[str, Any]:
    """rapidocr's lines (``[box, text, score]``) and nudenet's detections (``{class,
    score, box}``) as the ``SCHEMA`` fields."""
    text_lines = [
        {
            "text": text,
            "confidence": round(float(score), 3),
            "box": [[round(x * scale_x), round(y * scale_y)] for x, y in box],
        }
        for box, text, score in lines
        if len(text.strip()) > 1 or (text.strip() and score >= LONE_CHARACTER_CONFIDENCE)
    ]
    characters = sum(len(line["text"]) for line in text_lines)
    confidence = (
        round(sum(line["confidence"] * len(line["text"]) for line in text_lines) / characters, 3)
        if characters
        else None
    )
    best: dict[str, float] = {}
    for found in detections:
        best[found["class"]] = max(best.get(found["class"], 0.0), float(found["score"]))
    labels = sorted(best.items(), key=lambda item: (-item[1], item[0]))
    unsafe = max((score for label, score in best.items() if label in UNSAFE_LABELS), default=0.0)
    return {
        "text": "\n".join(line["text"] for line in text_lines),
        "text_lines": text_lines,
        "text_confidence": confidence,
        "has_text": bool(text_lines),
        "nsfw_labels": [{"label": label, "score": round(score, 3)} for label, score in labels],
        "nsfw_score": round(unsafe, 3),
        "nsfw": unsafe >= nsfw_threshold,
    }


# ---------------------------------------------------------------- in a worker process
@dataclass(slots=True)
class _ProcessModels:
    """This process's models (``load_models``), or why they could not be loaded."""

    models: ContentModels | None = None
    error: str | None = None

    def loaded(self) -> ContentModels:
        if self.models is None:
            raise ModelError(self.error or "the content models are not loaded")
        return self.models


_here = _ProcessModels()


def load_models(threads: int, nsfw_threshold: float) -> None:
    """Load and warm this process's models (ModelError when they cannot be): what a pool
    worker does first; benchmarks and tests call it to read images in their own process."""
    models = ContentModels(threads, nsfw_threshold)
    models.warm_up()
    _here.models = models


def _start_worker(parent: int, threads: int, nsfw_threshold: float) -> None:
    """The pool's initializer."""
    # The parent stops the pool on shutdown; a Ctrl-C or SIGTERM sent to the whole process
    # group must not kill a worker in the middle of an item first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pools.watch_parent(parent)
    try:
        load_models(threads, nsfw_threshold)
    except Exception as exc:
        # An initializer that raises breaks the pool with no message; keep the reason for
        # the jobs to report instead.
        _here.error = exc.args[0] if isinstance(exc, ModelError) else _one_line(exc)


def loaded_models() -> ContentModels:
    """This process's models (ModelError saying why when there are none)."""
    return _here.loaded()


def _ready() -> int:
    loaded_models()
    return os.getpid()


def analyze_content(data: bytes, facts: ImageFacts) -> dict[str, Any]:
    """Facts plus content fields of one analysis image, with this process's models."""
    models = loaded_models()
    fields = local.analyze(data, facts)
    with Image.open(io.BytesIO(data)) as img:
        rgb = img.convert("RGB")
    bgr = np.ascontiguousarray(np.asarray(rgb)[:, :, ::-1])
    fields |= models.read(bgr, facts.width / rgb.width, facts.height / rgb.height)
    return fields


# ---------------------------------------------------------------- in the analyzer
class ModelPool:
    """Worker processes that each hold the content models: started (loaded and warmed)
    before the analyzer takes items, replaced if a worker dies."""

    def __init__(self, workers: int, threads: int, nsfw_threshold: float) -> None:
        self.workers = workers
        self._initargs = (os.getpid(), threads, nsfw_threshold)
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        # "spawn": a fresh interpreter per worker; forking a process that runs an event
        # loop and threads is unsafe.
        return ProcessPoolExecutor(
            self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=self._initargs,
        )

    async def start(self) -> None:
        """Start every worker and wait until each has loaded and warmed its models;
        ModelError (one line) when they cannot be loaded."""
        loop = asyncio.get_running_loop()
        # One job per worker: a pool spawns a process per job while none is idle, and
        # every process runs the initializer before its first job.
        jobs = [loop.run_in_executor(self._pool, _ready) for _ in range(self.workers)]
        try:
            pids = await asyncio.gather(*jobs)
        except BrokenProcessPool:
            raise ModelError("a content model worker died while loading its models") from None
        log.info("content models loaded", extra={"workers": len(set(pids))})

    async def analyze(self, data: bytes, facts: ImageFacts) -> dict[str, Any]:
        job = partial(analyze_content, data, facts)
        loop = asyncio.get_running_loop()
        pool = self._pool
        try:
            return await loop.run_in_executor(pool, job)
        except BrokenProcessPool:
            # A worker died (out of memory, killed) and took every job in the pool with
            # it. The culprit is unknown: each job gets one more try in a fresh pool.
            self._replace(pool)
        pool = self._pool
        try:
            return await loop.run_in_executor(pool, job)
        except BrokenProcessPool:
            self._replace(pool)
            raise ItemError(
                ErrorClass.ANALYZER_ERROR, "a content model worker died on this image"
            ) from None

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        if broken is self._pool:  # the first of its jobs to notice replaces it
            log.warning("a content model worker died; replacing the model pool")
            broken.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()

    async def close(self) -> None:
        # Wait for the workers here: left to the interpreter's exit hook, the pool's
        # wake-up pipe can be closed under it (a spurious traceback).
        await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)
