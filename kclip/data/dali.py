"""The DALI training and evaluation pipeline over indexed webdataset shards (imported only when used).

The host decides what DALI reads and how each image is cropped; DALI decodes, crops, resizes and normalises::

    host thread, a few batches ahead: the rank's batches of the epoch (kclip.data.loader.epoch_batches)
      ─ each sample's image, caption and .json bytes, read from its tar at the offsets of its index
      ─ its crop box from the image's header: training, `random_box` drawn from sample_rng(seed, epoch, key) (and
        the flip), as the CPU twin's pil_train draws them; evaluation, the centred square
      ─ captions tokenised (open_clip), metadata collated (kclip.data.loader.collate_metadata)
    DALI: fn.external_source(encoded image, box, flip)
      ─ decoders.image (device "mixed", or "cpu" without a GPU; EXIF orientation ignored, as PIL's decode does)
      ─ resize of the box to S x S (a region of interest) ─ crop_mirror_normalize (CLIP mean / std, CHW float32)

Feeding DALI from the host rather than through fn.readers.webdataset (whose shuffle buffer runs across epochs and
whose crops follow the pipeline's random stream) gives exact epochs, a new order at each `set_epoch`, resumption at
any batch, and the very batches of the CPU twin: the same keys, captions and metadata, and pixels within 2/255 of the
twin's, training crops included (the transforms are those of kclip.data.transforms).

DALI reads only shards whose index `kclip data index` wrote, so a bad sample never reaches the decoder: DALI cannot
skip one (a truncated JPEG ends the pipeline). A sample the host cannot use (its image header or caption unreadable)
is skipped and counted as the twin does.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import itertools
import logging
from collections import Counter, deque
from collections.abc import Iterator
from typing import Any

import numpy as np

from kclip.data.index import IndexedShards
from kclip.data.loader import (
    EpochOrder,
    EpochPosition,
    ShardRows,
    collate_metadata,
    sample_rng,
    usable_sample,
)
from kclip.data.shards import RawSample, sample_caption
from kclip.data.tokenize import Tokenizer, clip_tokenizer
from kclip.data.transforms import TransformConfig, center_box, random_box

log = logging.getLogger(__name__)

PREFETCH_QUEUE_DEPTH = 2  # batches DALI prepares ahead; the host thread reads one more


def dali_status() -> tuple[bool, str]:
    """(usable, why not): whether nvidia.dali imports."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        return False, f"nvidia.dali does not import ({e}); pip install nvidia-dali-cuda130"
    return True, ""


def build_pipeline(
    source,
    cfg: TransformConfig,
    *,
    batch_size: int,
    device_id: int | None,
    num_threads: int = 4,
    hw_decoder_load: float = 0.65,
    prefetch_queue_depth: int = PREFETCH_QUEUE_DEPTH,
):
    """A DALI pipeline of images float32 [B, 3, S, S] from the encoded images, crop boxes and flips `source` gives.

    Args:
        source: called by DALI for each batch, returns (encoded images: B uint8 arrays, roi_start float32 [B, 2]
            and roi_end float32 [B, 2]: the box's (y, x) corners in source pixels, mirror int32 [B]), B at most
            batch_size; raises StopIteration at the end of a pass.
        cfg: the transforms.
        batch_size: the largest batch.
        device_id: CUDA device for the "mixed" decoder and GPU resize, None for a CPU-only pipeline.
        num_threads: CPU threads of the pipeline.
        hw_decoder_load: share of JPEGs given to the hardware decoder (GPUs that have one; "mixed" only).
        prefetch_queue_depth: batches prepared ahead.
    """
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    size = cfg.image_size
    interp = types.INTERP_CUBIC if cfg.interpolation == "bicubic" else types.INTERP_LINEAR
    mixed = device_id is not None
    # adjust_orientation=False: the host computes boxes from the stored width and height, as PIL decodes them.
    decoder_args: dict[str, Any] = {"device": "mixed" if mixed else "cpu", "output_type": types.RGB}
    decoder_args["adjust_orientation"] = False
    if mixed:
        # jpeg_fancy_upsampling: the chroma upsampling of libjpeg-turbo (the CPU decoders, PIL), for agreement.
        decoder_args.update(hw_decoder_load=hw_decoder_load, jpeg_fancy_upsampling=True)

    # exec_dynamic: outputs stay valid after the next run, so torch takes them through DLPack without a copy.
    @pipeline_def(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        prefetch_queue_depth=prefetch_queue_depth,
        exec_dynamic=True,
    )
    def pipeline():
        encoded, roi_start, roi_end, mirror = fn.external_source(
            source=source, num_outputs=4, batch=True, dtype=[types.UINT8, types.FLOAT, types.FLOAT, types.INT32]
        )
        image = fn.decoders.image(encoded, **decoder_args)
        image = fn.resize(
            image, size=[size, size], roi_start=roi_start, roi_end=roi_end, interp_type=interp, antialias=True
        )
        return fn.crop_mirror_normalize(
            image,
            dtype=types.FLOAT,
            output_layout="CHW",
            mean=[255.0 * m for m in cfg.mean],
            std=[255.0 * s for s in cfg.std],
            mirror=mirror,
        )

    return pipeline()


@dataclasses.dataclass
class _HostBatch:
    """The host's part of one batch: DALI's inputs and the batch's other fields."""

    position: int  # the batch's index in the epoch
    encoded: list[np.ndarray]  # B uint8 arrays
    roi_start: np.ndarray  # float32 [B, 2], (y0, x0)
    roi_end: np.ndarray  # float32 [B, 2], (y1, x1)
    mirror: np.ndarray  # int32 [B]
    fields: dict[str, Any]  # tokens, key, caption and the metadata fields
    bad: list[tuple[str, str]]  # (key, reason) of the samples skipped


def _caption_and_size(sample: RawSample) -> tuple[str | None, tuple[int, int] | None, str | None]:
    """(caption, (width, height) from the image's header, None), or (None, None, why)."""
    from PIL import Image

    if sample.problem is not None:
        return None, None, sample.problem
    ext = sample.image_ext()
    if ext is None:
        return None, None, "no image"
    caption, why = sample_caption(sample)
    if why is not None:
        return None, None, why
    try:
        with Image.open(io.BytesIO(sample.data[ext])) as img:
            return caption, img.size, None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... on bad data
        return None, None, f"image header does not parse: {type(e).__name__}: {e}"


class DaliLoader(EpochPosition):
    """Iterate batches of the DALI pipeline as dicts, the same as the CPU twin's (kclip.data.loader), with images,
    tokens, labels and attributes on the pipeline's GPU (on the CPU for device_id=None).

    A pass of iteration is one epoch of this rank's batches in the order of `epoch_batches`; `set_epoch` draws a new
    order, `set_epoch(epoch, start_batch)` or `load_state_dict` resume at a batch. A pass left unfinished is
    dropped when the next one starts (the batches DALI prepared for it are discarded).

    Attributes:
        epoch: the epoch of the next (or current) pass.
        bad: [(key, reason)] of every sample skipped so far.
        skipped: Counter of reasons (details stripped).
    """

    def __init__(
        self,
        shards: IndexedShards,
        cfg: TransformConfig,
        *,
        batch_size: int,
        train: bool,
        device_id: int | None,
        rank: int = 0,
        world_size: int = 1,
        num_threads: int = 4,
        seed: int = 0,
        shuffle: bool | None = None,
        drop_last: bool = False,
        hw_decoder_load: float = 0.65,
        tokenizer: Tokenizer | None = None,
    ):
        self.order = EpochOrder(batch_size, rank, world_size, seed, train if shuffle is None else shuffle, drop_last)
        self.rows = ShardRows.build(list(zip(shards.paths, shards.index_paths, strict=True)))
        self.cfg, self.train, self.device_id = cfg, train, device_id
        self.tokenizer = tokenizer
        self.epoch = 0
        self.bad: list[tuple[str, str]] = []
        self.skipped: Counter[str] = Counter()
        self._start = 0  # the batch the next pass starts at
        self._position = 0  # batches of the epoch passed
        self._feed: Iterator[_HostBatch] = iter(())  # what the external source hands DALI next
        self._in_pipeline: deque[_HostBatch] = deque()  # handed to DALI, output not yet taken, in order
        self._active: Iterator[dict[str, Any]] | None = None
        self._host = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kclip-dali-host")
        self.pipeline = build_pipeline(
            self._next_input,
            cfg,
            batch_size=batch_size,
            device_id=device_id,
            num_threads=num_threads,
            hw_decoder_load=hw_decoder_load,
        )
        self.pipeline.build()

    def __len__(self) -> int:
        return self.order.count(len(self.rows))

    def sample_keys(self) -> np.ndarray:
        """The keys (bytes [N]) of every sample of the data set, all ranks', in stored order."""
        return self.rows.keys

    # -- the host side --

    def _host_batch(self, epoch: int, position: int, rows: np.ndarray) -> _HostBatch:
        encoded, starts, ends, mirror, keys, captions, metas, bad = [], [], [], [], [], [], [], []
        for sample in self.rows.read(rows):
            meta, caption, size, why = usable_sample(sample, _caption_and_size)
            if why is not None:
                bad.append((sample.key, why))
                continue
            if self.train:
                # The draws of kclip.data.transforms.pil_train, in its order: the box, then the flip.
                rng = sample_rng(self.order.seed, epoch, sample.key)
                x0, y0, x1, y1 = random_box(rng, *size, self.cfg.scale, self.cfg.ratio)
                flip = self.cfg.flip_p > 0 and rng.random() < self.cfg.flip_p
            else:
                (x0, y0, x1, y1), flip = center_box(*size), False
            encoded.append(np.frombuffer(sample.data[sample.image_ext()], dtype=np.uint8))
            starts.append((y0, x0))
            ends.append((y1, x1))
            mirror.append(flip)
            keys.append(sample.key)
            captions.append(caption)
            metas.append(meta)
        fields: dict[str, Any] = {"key": keys, "caption": captions}
        if keys:
            fields = {"tokens": (self.tokenizer or clip_tokenizer())(captions), **fields}  # [B, 77]
        return _HostBatch(
            position,
            encoded,
            np.asarray(starts, dtype=np.float32).reshape(-1, 2),
            np.asarray(ends, dtype=np.float32).reshape(-1, 2),
            np.asarray(mirror, dtype=np.int32),
            {**fields, **collate_metadata(metas, keys)},
            bad,
        )

    def _host_batches(self, epoch: int, batches: list[np.ndarray], begin: int) -> Iterator[_HostBatch]:
        """The host part of batches begin, begin + 1, ... of `epoch`, read by the host thread ahead of DALI."""
        todo = iter(range(begin, len(batches)))
        submit = lambda j: self._host.submit(self._host_batch, epoch, j, batches[j])
        ahead = deque(submit(j) for j in itertools.islice(todo, PREFETCH_QUEUE_DEPTH + 1))
        while ahead:
            batch = ahead.popleft().result()
            ahead.extend(submit(j) for j in itertools.islice(todo, 1))
            yield batch

    def _next_input(self):
        """DALI's external source: the inputs of the next batch holding a usable sample (see build_pipeline)."""
        for batch in self._feed:
            self.bad.extend(batch.bad)
            self.skipped.update(r.split(":", 1)[0] for _, r in batch.bad)
            if batch.fields["key"]:
                self._in_pipeline.append(batch)
                return batch.encoded, batch.roi_start, batch.roi_end, batch.mirror
        raise StopIteration

    # -- passes --

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._active is not None:
            self._active.close()  # an unfinished pass: its finally empties the pipeline
        batches = self.order.batches(self.rows.keys, self.epoch)
        self._position, self._start = self._start, 0  # a later pass without set_epoch replays the epoch whole
        self._active = self._pass(batches, self._position)
        return self._active

    def _pass(self, batches: list[np.ndarray], begin: int) -> Iterator[dict[str, Any]]:
        import torch

        self._feed = self._host_batches(self.epoch, batches, begin)
        skipped = len(self.bad)
        try:
            self.pipeline.schedule_run()
            while True:
                try:
                    (images,) = self.pipeline.outputs()
                except StopIteration:
                    break
                host = self._in_pipeline.popleft()
                if self.device_id is None:
                    image = torch.from_dlpack(images.as_tensor())  # [B, 3, S, S]
                else:
                    with torch.cuda.device(self.device_id):
                        image = torch.from_dlpack(images.as_tensor())
                self.pipeline.schedule_run()  # DALI works on the next batch while this one is used
                fields = host.fields
                if self.device_id is not None:
                    fields = {
                        k: v.to(image.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in fields.items()
                    }
                self._position = host.position + 1
                yield {"image": image, **fields}
            self._position = len(batches)
        finally:
            self._finish()
        if len(self.bad) > skipped:
            log.warning("skipped %d bad samples this epoch (%s)", len(self.bad) - skipped, dict(self.skipped))

    def _finish(self) -> None:
        """Bring the pipeline back to the start of a pass: no more input, the batches still in it dropped."""
        self._feed = iter(())
        if getattr(self.pipeline, "_pipe", None) is None:  # an unfinished pass collected after its pipeline: done
            return
        self.pipeline.schedule_run()  # the source's StopIteration ends DALI's epoch (a no-op where it has ended)
        while True:
            try:
                self.pipeline.outputs()
            except StopIteration:
                break
        self.pipeline.reset()
        self._in_pipeline.clear()
