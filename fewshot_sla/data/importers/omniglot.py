"""Omniglot (Lake et al. 2015) as users hold it: the release's two zips, the same extracted, or torchvision's
``omniglot-py/`` folder (which holds either).

The release has ``images_background/`` (30 alphabets) and ``images_evaluation/`` (20 alphabets), each
``<Alphabet>/characterNN/<cccc>_<dd>.png`` (105x105, 1 bit: ink black on white). A class is one character,
named ``<Alphabet>/characterNN`` (alphabet names are unique across the two sets), or under the rotated-class
protocol one character at one rotation, ``<Alphabet>/characterNN/rotDDD``. Image identifiers are the paths
inside the release (``images_background/<Alphabet>/characterNN/<file>``), with ``@rotDDD`` for a rotated copy.

Rotated classes are stored, not made on the fly: the whole rotated store is 130k images of 28x28x1 (102 MB),
so memory is no reason to rotate at sampling time, and a stored row is an image with its own identifier, so
the store's fingerprint, digests and episode identities stay exact with no special case in the sampler.
Each image is resized to 28x28 first and rotated after, so that a stored rotated class is exactly
``torch.rot90`` of the stored upright one: the rotation SLA applies (Lanczos is not exactly rotation-equivariant
at the pixel level, so the other order would differ from it in a few grey levels). Images are kept greyscale
(one channel, as the published Omniglot backbones take) at the release's polarity; the dataset's normalisation
turns them into ink 1 on 0, as the published code feeds them.
"""

from __future__ import annotations

import io
import zipfile
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from fewshot_sla.data.conventions import SplitConvention
from fewshot_sla.data.importers.common import BadImage, Layout, RawSplit, check_same_classes, stack_split
from fewshot_sla.data.store import SPLIT_NAMES
from fewshot_sla.errors import UserError, setting
from fewshot_sla.io_errors import io_error

SETS = ("images_background", "images_evaluation")
ROTATION_SUFFIX = "/rot"


def _candidates(source: Path) -> list[Path]:
    return [source, source / "omniglot-py"]


def _locate_zips(source: Path) -> Path | None:
    for folder in _candidates(source):
        present = [name for name in SETS if (folder / f"{name}.zip").is_file()]
        if len(present) == len(SETS):
            return folder
        if present:
            missing = next(name for name in SETS if name not in present)
            raise UserError(f"{folder} has {present[0]}.zip but not {missing}.zip; add it (both come with Omniglot)")
    return None


def _locate_folders(source: Path) -> Path | None:
    for folder in _candidates(source):
        present = [name for name in SETS if (folder / name).is_dir()]
        if len(present) == len(SETS):
            return folder
    return None


def _zip_files(root: Path) -> list[Path]:
    return [root / f"{name}.zip" for name in SETS]


def _folder_files(root: Path) -> list[Path]:
    return sorted(p for name in SETS for p in (root / name).glob("*/*/*.png"))


def _member_index(names: Iterator[str]) -> dict[str, list[str]]:
    """``<set>/<Alphabet>/<character>/<file>.png`` paths -> character class name -> its paths, sorted."""
    index: dict[str, list[str]] = defaultdict(list)
    for name in names:
        parts = name.split("/")
        if len(parts) == 4 and parts[0] in SETS and parts[3].lower().endswith(".png"):
            index[f"{parts[1]}/{parts[2]}"].append(name)
    return {character: sorted(paths) for character, paths in index.items()}


def _read_zips(root: Path) -> tuple[dict[str, list[str]], Callable[[str], bytes]]:
    """Every PNG of both zips, read into memory once (15 MB), so that decoding threads share no file handle."""
    blobs: dict[str, bytes] = {}
    for path in _zip_files(root):
        try:
            with zipfile.ZipFile(path) as archive:
                for info in archive.infolist():
                    if not info.is_dir() and info.filename.lower().endswith(".png"):
                        blobs[info.filename] = archive.read(info)
        except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile) as err:
            raise UserError(f"{path} is not a readable zip ({err}); download it again (is it truncated?)") from None
        except OSError as err:
            raise io_error(err, path, "read") from None
    return _member_index(iter(blobs)), blobs.__getitem__


def _read_folders(root: Path) -> tuple[dict[str, list[str]], Callable[[str], bytes]]:
    names = (str(p.relative_to(root)) for name in SETS for p in (root / name).glob("*/*/*.png"))

    def read(name: str) -> bytes:
        try:
            return (root / name).read_bytes()
        except OSError as err:
            raise BadImage(root / name, f"cannot read ({err.strerror})") from None

    return _member_index(names), read


def decode(data: bytes, where: str) -> np.ndarray:
    """One Omniglot PNG as greyscale uint8 ``[h, w, 1]`` (0 ink, 255 paper)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("L"))[:, :, None]
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise BadImage(where, f"cannot decode ({err})") from None


def _character_and_turns(class_name: str) -> tuple[str, int, str]:
    """``Alphabet/characterNN/rot090`` -> (``Alphabet/characterNN``, 1 quarter turn, identifier suffix ``@rot090``);
    a class without rotation -> (its name, 0, "")."""
    character, _, degrees = class_name.partition(ROTATION_SUFFIX)
    if not degrees:
        return character, 0, ""
    return character, int(degrees) // 90, f"@rot{degrees}"


def _reader(
    index_of: Callable[[Path], tuple[dict[str, list[str]], Callable[[str], bytes]]],
) -> Callable[[Path, SplitConvention], Iterator[tuple[str, RawSplit]]]:
    def read(root: Path, convention: SplitConvention) -> Iterator[tuple[str, RawSplit]]:
        index, read_bytes = index_of(root)
        if not index:
            raise UserError(
                f"{root} holds no Omniglot character images (images_background/<Alphabet>/characterNN/*.png); "
                f"check {setting('source')}"
            )
        for split in SPLIT_NAMES:
            class_names = convention.classes[split]
            parsed = {name: _character_and_turns(name) for name in class_names}
            characters = {character for character, _, _ in parsed.values()}
            check_same_classes(characters & index.keys(), characters, str(root), split)
            files = {name: index[character] for name, (character, _, _) in parsed.items()}
            ids = {name: [path + parsed[name][2] for path in files[name]] for name in class_names}
            labels, paths, image_ids = stack_split(class_names, files, ids)
            turns = np.array([parsed[class_names[label]][1] for label in labels], dtype=np.int64)

            def load(i: int, paths: list[str] = paths) -> np.ndarray:
                return decode(read_bytes(paths[i]), str(root / paths[i]))

            yield split, RawSplit(class_names, labels, image_ids, load=load, quarter_turns=turns)

    return read


ZIPS = Layout(
    name="omniglot-zips",
    summary="images_background.zip and images_evaluation.zip (Lake et al.'s release, or omniglot-py/)",
    locate=_locate_zips,
    source_files=_zip_files,
    read=_reader(_read_zips),
)
FOLDERS = Layout(
    name="omniglot-folders",
    summary="images_background/ and images_evaluation/ extracted (or torchvision's omniglot-py/)",
    locate=_locate_folders,
    source_files=_folder_files,
    read=_reader(_read_folders),
)
LAYOUTS = (FOLDERS, ZIPS)
