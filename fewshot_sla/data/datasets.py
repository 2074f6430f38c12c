"""The built-in datasets (``DATASETS`` entries): standard image size, split convention, raw layouts read.

A plug-in adds a dataset the same way: ``DATASETS.add(name, DatasetInfo(...))`` with its own ``Layout``s
(or a ``generator`` for a dataset made from a seed); ``fewshot-sla data prepare`` then handles it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from fewshot_sla.data.importers.cifar import CIFAR100_PYTHON
from fewshot_sla.data.importers.common import Layout, RawSplit
from fewshot_sla.data.importers.cub import CUB
from fewshot_sla.data.importers.l2l import L2L
from fewshot_sla.data.importers.metaoptnet import CIFAR_FS, FC100, MINI
from fewshot_sla.data.importers.omniglot import LAYOUTS as OMNIGLOT
from fewshot_sla.data.importers.ravi import RAVI
from fewshot_sla.data.importers.tiered import LAYOUTS as TIERED
from fewshot_sla.data.store import IMAGENET_NORMALIZATION, Normalization
from fewshot_sla.data.synthetic import IMAGE_SIZE as SYNTHETIC_SIZE
from fewshot_sla.data.synthetic import generator_identity, synthetic_splits
from fewshot_sla.registry import DATASETS

# Omniglot's strokes are black on white; the published code (Snell et al.'s, Finn et al.'s) feeds 1 - x, ink 1
# on a 0 background (so that zero padding is blank paper): (x - 1) / -1.
INK_ON_ZERO = Normalization(mean=(1.0,), std=(-1.0,))


@dataclass(frozen=True)
class DatasetInfo:
    """What the suite knows about one dataset and how ``prepare`` builds its store.

    Imported datasets list the raw ``layouts`` they accept (tried in order) and where their split lists
    live (``split_format`` / ``packaged_splits``, see ``conventions``); generated ones have a
    ``generator(seed, image_size)`` yielding ``(split, RawSplit)`` instead, and a ``generator_identity()``
    that changes whenever the generator's output would (so an outdated store is rebuilt, not reused).
    """

    name: str
    title: str
    image_size: int
    split_convention: str
    source_hint: str = ""
    layouts: tuple[Layout, ...] = ()
    split_format: str | None = None
    packaged_splits: str | None = None
    generator: Callable[[int, int], Iterator[tuple[str, RawSplit]]] | None = None
    generator_identity: Callable[[], str] | None = None
    channels: int = 3
    normalization: Normalization = IMAGENET_NORMALIZATION

    @property
    def packaged_files(self) -> tuple[str, str, str] | None:
        """``(convention, split_format, packaged folder)`` when the packaged split lists name every image
        (mini-ImageNet's Ravi CSVs), so identifiers are known without a store; else None."""
        if self.split_format != "ravi-csv" or self.packaged_splits is None:
            return None
        return self.split_convention, self.split_format, self.packaged_splits


for _info in (
    DatasetInfo(
        name="miniimagenet",
        title="mini-ImageNet",
        image_size=84,
        split_convention="ravi",
        source_hint="the folder holding images/ + train.csv/val.csv/test.csv, the learn2learn "
        "mini-imagenet-cache-*.pkl files, or the MetaOptNet miniImageNet_category_split_*.pickle files",
        layouts=(RAVI, L2L, MINI),
        split_format="ravi-csv",
        packaged_splits="miniimagenet_ravi",
    ),
    DatasetInfo(
        name="cub",
        title="CUB-200-2011",
        image_size=84,
        split_convention="closerlook",
        source_hint="CUB_200_2011/ or the folder holding it",
        layouts=(CUB,),
        split_format="class-json",
        packaged_splits="torchmeta/cub",
    ),
    DatasetInfo(
        name="fc100",
        title="FC100",
        image_size=32,
        split_convention="tadam",
        source_hint="cifar-100-python/ (or the folder holding it), "
        "or the folder of the MetaOptNet FC100_*.pickle files",
        layouts=(CIFAR100_PYTHON, FC100),
        split_format="superclass-json",
        packaged_splits="torchmeta/cifar100/fc100",
    ),
    DatasetInfo(
        name="cifarfs",
        title="CIFAR-FS",
        image_size=32,
        split_convention="bertinetto",
        source_hint="cifar-100-python/ (or the folder holding it), "
        "or the folder of the MetaOptNet CIFAR_FS_*.pickle files",
        layouts=(CIFAR100_PYTHON, CIFAR_FS),
        split_format="pair-json",
        packaged_splits="torchmeta/cifar100/cifar-fs",
    ),
    DatasetInfo(
        name="tieredimagenet",
        title="tieredImageNet",
        image_size=84,
        split_convention="ren",
        source_hint="the folder of the {train,val,test}_images_png.pkl + _labels.pkl files (Ren et al., learn2learn), "
        "of the {train,val,test}_images.npz + _labels.pkl files (MetaOptNet), or holding train/, val/, test/ "
        "with one folder per wnid (tiered-imagenet-tools)",
        layouts=TIERED,
        split_format="tiered-csv",
        packaged_splits="tieredimagenet",
    ),
    DatasetInfo(
        name="tinyimagenet",
        title="Tiny ImageNet in mini-ImageNet format (a small stand-in for mini-ImageNet)",
        image_size=64,
        split_convention="source-csv",
        source_hint="a folder laid out like the Ravi mini-ImageNet release (images/ + train.csv/val.csv/test.csv), "
        "whose own CSVs define the split",
        layouts=(RAVI,),
        split_format="ravi-csv",
    ),
    DatasetInfo(
        name="omniglot",
        title="Omniglot, Vinyals et al.'s protocol (rotated characters as classes)",
        image_size=28,
        split_convention="vinyals",
        source_hint="the folder of images_background.zip + images_evaluation.zip (Lake et al.'s release), "
        "the same extracted (images_background/, images_evaluation/), or torchvision's omniglot-py/",
        layouts=OMNIGLOT,
        split_format="omniglot-rotated-json",
        packaged_splits="torchmeta/omniglot",
        channels=1,
        normalization=INK_ON_ZERO,
    ),
    DatasetInfo(
        name="omniglot-lake",
        title="Omniglot, Lake et al.'s protocol (background alphabets -> evaluation alphabets, no rotation)",
        image_size=28,
        split_convention="lake",
        source_hint="the folder of images_background.zip + images_evaluation.zip (Lake et al.'s release), "
        "the same extracted (images_background/, images_evaluation/), or torchvision's omniglot-py/",
        layouts=OMNIGLOT,
        split_format="omniglot-json",
        packaged_splits="omniglot_lake",
        channels=1,
        normalization=INK_ON_ZERO,
    ),
    DatasetInfo(
        name="omniglot-upright",
        title="Omniglot, Vinyals et al.'s split of characters without rotated classes",
        image_size=28,
        split_convention="vinyals-upright",
        source_hint="the folder of images_background.zip + images_evaluation.zip (Lake et al.'s release), "
        "the same extracted (images_background/, images_evaluation/), or torchvision's omniglot-py/",
        layouts=OMNIGLOT,
        split_format="omniglot-json",
        packaged_splits="torchmeta/omniglot",
        channels=1,
        normalization=INK_ON_ZERO,
    ),
    DatasetInfo(
        name="synthetic",
        title="synthetic shapes",
        image_size=SYNTHETIC_SIZE,
        split_convention="synthetic-64/16/20",
        generator=synthetic_splits,
        generator_identity=generator_identity,
    ),
):
    DATASETS.add(_info.name, _info)
