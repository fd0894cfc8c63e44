"""The DALI training and evaluation pipeline over indexed webdataset shards (imported only when used).

Graph (one pipeline per rank)::

    fn.readers.webdataset(paths, index_paths, ext=[image exts, "txt"], shard_id=rank, num_shards=world)
      ├─ image ─ train: decoders.image_random_crop (device "mixed", or "cpu" without a GPU) ─ resize S x S
      │          eval:  decoders.image ─ resize of the centred square to S x S (a region of interest)
      │        ─ crop_mirror_normalize (CLIP mean / std, CHW float32, random mirror with flip_p)
      ├─ caption bytes ─ pad to the longest in the batch ─ decoded and tokenised (open_clip) on the host
      └─ source info "shard:offset:member" ─ padded likewise ─ the sample key (the member's basename)

DALI reads only shards whose index `kclip data index` wrote, so a bad sample never reaches the decoder: DALI cannot
skip one (a truncated JPEG ends the pipeline). The transforms are those of kclip.data.transforms, so this pipeline
and the CPU twin (kclip.data.loader) agree: exactly in keys and captions, within 2/255 in evaluation pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np

from kclip.data.index import IndexedShards
from kclip.data.shards import IMAGE_EXTS, split_name
from kclip.data.tokenize import Tokenizer, clip_tokenizer
from kclip.data.transforms import TransformConfig

log = logging.getLogger(__name__)

READER_NAME = "Reader"


def dali_status() -> tuple[bool, str]:
    """(usable, why not): whether nvidia.dali imports."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        return False, f"nvidia.dali does not import ({e}); pip install nvidia-dali-cuda130"
    return True, ""


def build_pipeline(
    shards: IndexedShards,
    cfg: TransformConfig,
    *,
    batch_size: int,
    train: bool,
    device_id: int | None,
    shard_id: int = 0,
    num_shards: int = 1,
    num_threads: int = 4,
    seed: int = 0,
    shuffle: bool | None = None,
    initial_fill: int = 1024,
    hw_decoder_load: float = 0.65,
    prefetch_queue_depth: int = 2,
):
    """A DALI pipeline yielding (image [B, 3, S, S] float32, caption bytes [B, Lc] uint8, source [B, Ls] uint8).

    Args:
        shards: indexed shards (`kclip.data.index.indexed_shards`).
        cfg: the transforms.
        batch_size: samples per batch.
        train: random resized crop (and flip) when True, the deterministic centre crop otherwise.
        device_id: CUDA device for the "mixed" decoder and GPU resize, None for a CPU-only pipeline.
        shard_id, num_shards: this rank's part of the data (DALI splits the sample list into contiguous ranges).
        num_threads: CPU threads of the pipeline.
        seed: seeds the reader's shuffle and the random crops.
        shuffle: shuffle within a buffer of `initial_fill` samples (default: when training).
        hw_decoder_load: share of JPEGs given to the hardware decoder (GPUs that have one; "mixed" only).
        prefetch_queue_depth: batches prepared ahead.
    """
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    shuffle = train if shuffle is None else shuffle
    size = cfg.image_size
    interp = types.INTERP_CUBIC if cfg.interpolation == "bicubic" else types.INTERP_LINEAR
    mixed = device_id is not None
    decoder_args: dict[str, Any] = {"device": "mixed" if mixed else "cpu", "output_type": types.RGB}
    if mixed:
        # jpeg_fancy_upsampling: the chroma upsampling of libjpeg-turbo (the CPU decoders, PIL), for agreement.
        decoder_args.update(hw_decoder_load=hw_decoder_load, jpeg_fancy_upsampling=True)

    @pipeline_def(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        seed=seed,
        prefetch_queue_depth=prefetch_queue_depth,
    )
    def pipeline():
        encoded, caption = fn.readers.webdataset(
            paths=[str(p) for p in shards.paths],
            index_paths=[str(p) for p in shards.index_paths],
            ext=[";".join(IMAGE_EXTS), "txt"],
            missing_component_behavior="error",
            random_shuffle=shuffle,
            initial_fill=initial_fill,
            shard_id=shard_id,
            num_shards=num_shards,
            pad_last_batch=not train,
            name=READER_NAME,
        )
        source = fn.get_property(encoded, key="source_info")
        if train:
            image = fn.decoders.image_random_crop(
                encoded,
                random_area=list(cfg.scale),
                random_aspect_ratio=list(cfg.ratio),
                num_attempts=10,
                **decoder_args,
            )
            image = fn.resize(image, size=[size, size], interp_type=interp, antialias=True)
        else:
            # The centred square as a region of interest, as PIL's resize(box=center_box(...)) in the CPU twin.
            shape = fn.peek_image_shape(encoded, dtype=types.FLOAT)
            h, w = shape[0], shape[1]
            side = dmath.min(h, w)
            y0, x0 = (h - side) * 0.5, (w - side) * 0.5
            image = fn.decoders.image(encoded, **decoder_args)
            image = fn.resize(
                image,
                size=[size, size],
                roi_start=fn.stack(y0, x0),
                roi_end=fn.stack(y0 + side, x0 + side),
                interp_type=interp,
                antialias=True,
            )
        mirror = fn.random.coin_flip(probability=cfg.flip_p) if train and cfg.flip_p > 0 else 0
        image = fn.crop_mirror_normalize(
            image,
            dtype=types.FLOAT,
            output_layout="CHW",
            mean=[255.0 * m for m in cfg.mean],
            std=[255.0 * s for s in cfg.std],
            mirror=mirror,
        )
        return image, fn.pad(caption, fill_value=0), fn.pad(source, fill_value=0)

    return pipeline()


def _strings(rows) -> list[str]:
    """Rows of a zero-padded uint8 [B, L] tensor -> strings."""
    arr = np.asarray(rows.cpu() if hasattr(rows, "cpu") else rows, dtype=np.uint8)
    return [bytes(r).rstrip(b"\0").decode("utf-8", errors="replace") for r in arr]


def key_of_source(source: str) -> str:
    """Sample key from DALI's source info ``<shard>:<offset>:<member name>``: the member's basename as webdataset
    forms its ``__key__`` (member names hold no ':', `kclip data index` leaves such samples out)."""
    return split_name(source.rsplit(":", 2)[-1])[0]


class DaliLoader:
    """Iterate batches of the DALI pipeline as dicts: {"image": [B, 3, S, S], "tokens": [B, 77], "key",
    "caption"} (the same as the CPU twin's; images on the pipeline's GPU, or on the CPU for device_id=None).

    One pass of iteration is one epoch of this rank's samples (the last batch may be partial unless drop_last).
    With shuffling, DALI draws each sample from a buffer of `initial_fill` samples that carries over the end of
    an epoch: an epoch has the right number of samples and each sample comes once per epoch on average, not
    exactly (the CPU twin drains its buffer at the end of each epoch).
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
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        self.shards, self.cfg, self.batch_size, self.device_id = shards, cfg, batch_size, device_id
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.tokenizer = tokenizer
        self.pipeline = build_pipeline(
            shards,
            cfg,
            batch_size=batch_size,
            train=train,
            device_id=device_id,
            shard_id=rank,
            num_shards=world_size,
            num_threads=num_threads,
            seed=seed,
            shuffle=shuffle,
            hw_decoder_load=hw_decoder_load,
        )
        self.pipeline.build()
        self._iterator = DALIGenericIterator(
            self.pipeline,
            ["image", "caption", "source"],
            reader_name=READER_NAME,
            last_batch_policy=LastBatchPolicy.DROP if drop_last else LastBatchPolicy.PARTIAL,
            auto_reset=True,
            prepare_first_batch=False,
        )

    def set_epoch(self, epoch: int) -> None:
        """Nothing to do: DALI reshuffles and rotates its shards by itself at each epoch."""

    def num_samples(self) -> int:
        """Samples this rank reads per epoch."""
        n = self.shards.num_samples
        return n * (self.rank + 1) // self.world_size - n * self.rank // self.world_size

    def __len__(self) -> int:
        n = self.num_samples()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        tokenizer = self.tokenizer or clip_tokenizer()
        for (out,) in self._iterator:
            captions = _strings(out["caption"])
            tokens = tokenizer(captions)  # [B, 77]
            if self.device_id is not None:
                tokens = tokens.to(out["image"].device, non_blocking=True)
            yield {
                "image": out["image"],
                "tokens": tokens,
                "key": [key_of_source(s) for s in _strings(out["source"])],
                "caption": captions,
            }
