"""Hostile training data: every bad folder, image, caption and file name gets one clear line naming the file and
what to do; odd images (CMYK, 16-bit, palette, alpha, rotated, huge) are converted correctly and cheaply; a stage
that refuses its input exits 1 without a traceback and leaves what it produced before untouched."""

import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from tests import corpus
from tests.conftest import REPO, cpu_hardware
from tests.corpus import latents_cached, preflight_in_process, preflight_stage, small_project, snapshot
from tests.images import toy_subject
from yem import atomic
from yem.data import images, samples
from yem.data.preflight import caption_manifest, survey
from yem.errors import DataError, ParamsError
from yem.params import DataParams, load_params


def settings(folder: Path, resolution: int = 32, small_images: str = "upscale") -> DataParams:
    return DataParams(instance_dir=str(folder), prior_dir=None, resolution=resolution, buckets="auto",
                      center_crop=True, random_flip=False, small_images=small_images)


def survey_error(folder: Path, **kwargs) -> str:
    with pytest.raises(DataError) as caught:
        survey(settings(folder, **kwargs), folder.parent)
    return str(caught.value)


def photos(folder: Path, *names: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        corpus.photo(folder / name, format="PNG" if name.lower().endswith(".png") else "JPEG")
    return folder


# --- folders -------------------------------------------------------------------------------------------------

def test_a_missing_folder_a_file_and_an_empty_folder_are_refused(tmp_path):
    missing = tmp_path / "nope"
    assert survey_error(missing) == (f"data.instance_dir: folder {missing} does not exist. Create it and add "
                                     f"images, or fix the path.")
    file = corpus.photo(tmp_path / "one.jpg")
    assert survey_error(file) == f"data.instance_dir: {file} is a file, not a folder. Point it at the folder of images."
    empty = tmp_path / "empty"
    empty.mkdir()
    assert survey_error(empty).startswith(f"data.instance_dir: no images in {empty} (got 0 other files). Add .bmp, ")


def test_a_folder_without_images_says_what_it_holds(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "IMG_0001.DNG").write_bytes(b"II*\x00")
    (folder / "notes.md").write_text("my dog")
    (folder / ".DS_Store").write_bytes(b"\x00")
    message = survey_error(folder)
    assert message.startswith(f"data.instance_dir: no images in {folder} (got 2 other files: IMG_0001.DNG, "
                              f"notes.md). Add .bmp, .heic, .heif, .jpeg, .jpg, .png")


def test_files_that_are_not_images_are_skipped_with_a_note(tmp_path):
    folder = photos(tmp_path / "photos", "dog.png")
    (folder / "readme.md").write_text("hello")
    (folder / "IMG_0002.nef").write_bytes(b"raw")
    (folder / "more").mkdir()
    (folder / "orphan.txt").write_text("a caption whose image is gone")
    (folder / ".DS_Store").write_bytes(b"\x00")
    found = samples.discover(folder, "instance", "data.instance_dir")
    assert [s.id for s in found.samples] == ["instance/dog"]
    assert sorted(found.notes) == sorted([
        f"{folder / 'readme.md'}: skipped, not an image (.bmp, .heic, .heif, .jpeg, .jpg, .png, .tif, .tiff, "
        f".webp).",
        f"{folder / 'IMG_0002.nef'}: skipped, camera raw cannot be read. Export it as JPEG or PNG to use it.",
        f"{folder / 'more'}: skipped, a folder (images in subfolders are not used). Move them up to use them.",
        f"{folder / 'orphan.txt'}: caption with no image named orphan.*; ignored. Rename it after its image, or "
        f"remove it.",
    ])


# --- broken image files ----------------------------------------------------------------------------------------

def test_every_broken_image_is_reported_at_once_one_line_each(tmp_path):
    scratch, folder = tmp_path / "scratch", photos(tmp_path / "photos", "fine.jpg")
    scratch.mkdir()
    jpeg, png = scratch / "noisy.jpg", scratch / "noisy.png"
    toy_subject(0, (160, 128)).save(jpeg, quality=90)
    toy_subject(0, (160, 128)).save(png)
    (folder / "empty.png").write_bytes(b"")
    corpus.truncated(folder / "cut short.jpg", jpeg, keep=0.7)
    corpus.truncated(folder / "truncated.png", png, keep=0.7)
    corpus.png_with_bad_crc(folder / "bad crc.png", png)
    corpus.jpeg_with_bad_scan(folder / "bad scan.jpg", jpeg)
    (folder / "text.jpg").write_text("not a photo at all")
    lines = survey_error(folder).splitlines()
    assert lines[0] == "6 problems with the training data; fix each, then rerun:"
    expected = {"empty.png": "empty file (got 0 bytes). Re-export it, or remove it.",
                "cut short.jpg": "The file is truncated or corrupt: re-export it, or remove it.",
                "truncated.png": "The file is truncated or corrupt: re-export it, or remove it.",
                "bad crc.png": "The file is truncated or corrupt: re-export it, or remove it.",
                "bad scan.jpg": "The file is truncated or corrupt: re-export it, or remove it.",
                "text.jpg": "not an image Pillow can read (corrupt, or another format with an image suffix). "
                            "Re-export it, or remove it."}
    for name, what in expected.items():
        (line,) = [line for line in lines if line.startswith(f"  {folder / name}: ")]
        assert line.endswith(what), line
    assert "fine.jpg" not in "\n".join(lines)


# --- colour modes: check the pixels, not just the mode ------------------------------------------------------------

def _cmyk_tiff(path):
    image = Image.new("CMYK", (3, 1))
    image.putdata([(0, 255, 0, 0), (0, 0, 0, 255), (0, 0, 0, 128)])  # magenta, black, 50% grey
    image.save(path)
    return path, [(255, 0, 255), (0, 0, 0), (127, 127, 127)]


def _cmyk_jpeg(path):
    Image.new("CMYK", (16, 16), (255, 0, 0, 0)).save(path, quality=100)  # cyan
    return path, [(0, 255, 255)]


def _gray16(path):
    pixels = np.array([[0, 200, 32768, 65535]], dtype=np.uint16)
    return corpus.png_from_array(path, pixels, corpus.GRAY), [(0, 0, 0), (1, 1, 1), (128, 128, 128), (255, 255, 255)]


def _dark_gray16(path):
    # all values ≤ 255, which is near black in 16 bits: guessing "8-bit values" from them would make it bright
    pixels = np.array([[0, 100, 200, 255]], dtype=np.uint16)
    return corpus.png_from_array(path, pixels, corpus.GRAY), [(0, 0, 0), (0, 0, 0), (1, 1, 1), (1, 1, 1)]


def _rgb48(path):
    pixels = np.array([[[65535, 32768, 0], [256, 512, 1000]]], dtype=np.uint16)
    return corpus.png_from_array(path, pixels, corpus.RGB), [(255, 128, 0), (1, 2, 4)]


def _rgba64(path):
    pixels = np.array([[[65535, 0, 0, 65535], [0, 0, 65535, 0], [0, 65535, 0, 32768]]], dtype=np.uint16)
    return corpus.png_from_array(path, pixels, corpus.RGBA), [(255, 0, 0), (255, 255, 255), (127, 255, 127)]


def _palette(path, transparency=None):
    image = Image.new("P", (3, 1))
    image.putpalette([255, 0, 0, 0, 0, 255, 0, 255, 0])
    image.putdata([0, 1, 2])
    image.save(path, **({"transparency": transparency} if transparency is not None else {}))
    return path


def _palette_opaque(path):
    return _palette(path), [(255, 0, 0), (0, 0, 255), (0, 255, 0)]


def _palette_transparent(path):  # tRNS: red fully transparent, blue half, green opaque
    return _palette(path, transparency=bytes([0, 128, 255])), [(255, 255, 255), (127, 127, 255), (0, 255, 0)]


def _rgba(path):
    image = Image.new("RGBA", (3, 1))
    image.putdata([(0, 0, 255, 0), (0, 0, 255, 255), (255, 0, 0, 128)])
    image.save(path)
    return path, [(255, 255, 255), (0, 0, 255), (255, 127, 127)]


def _gray_alpha(path):
    image = Image.new("LA", (2, 1))
    image.putdata([(100, 255), (0, 0)])
    image.save(path)
    return path, [(100, 100, 100), (255, 255, 255)]


def _gray(path):
    image = Image.new("L", (2, 1))
    image.putdata([77, 250])
    image.save(path)
    return path, [(77, 77, 77), (250, 250, 250)]


def _bilevel(path):
    image = Image.new("1", (2, 1))
    image.putdata([0, 1])
    image.save(path)
    return path, [(0, 0, 0), (255, 255, 255)]


@pytest.mark.parametrize("build, name, tolerance", [
    (_cmyk_tiff, "cmyk.tif", 0), (_cmyk_jpeg, "cmyk.jpg", 4), (_gray16, "gray16.png", 0),
    (_dark_gray16, "dark-gray16.png", 0), (_rgb48, "rgb48.png", 1),
    (_rgba64, "rgba64.png", 1), (_palette_opaque, "palette.png", 0), (_palette_transparent, "palette-trns.png", 1),
    (_rgba, "rgba.png", 1), (_gray_alpha, "la.png", 0), (_gray, "gray.png", 0), (_bilevel, "bilevel.png", 0)])
def test_every_colour_mode_becomes_the_right_8_bit_rgb(tmp_path, build, name, tolerance):
    path, expected = build(tmp_path / name)
    for min_side in (None, 1):  # the plain decode, and the reduced-decode path the stages use
        image = images.open_image(path, min_side)
        assert image.mode == "RGB"
        got = np.asarray(image, dtype=int)[0, :len(expected)]
        assert np.abs(got - np.array(expected)).max() <= tolerance, (name, got.tolist(), expected)


# --- orientation, size -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("orientation, red_corner", [(None, "top-left"), (1, "top-left"), (3, "bottom-right"),
                                                     (6, "top-right"), (8, "bottom-left"), (2, "top-right")])
def test_exif_orientation_is_applied(tmp_path, orientation, red_corner):
    """A 64×32 landscape with a red block at its stored top-left, displayed as the EXIF tag says."""
    path = corpus.marked_photo(tmp_path / "rotated.jpg", orientation)
    portrait = orientation in (5, 6, 7, 8)
    for min_side, stored in ((None, (64, 32)), (4, (16, 8))):  # 4: JPEG decoded at 1/4 scale, then turned
        image = images.open_image(path, min_side)
        assert image.size == (stored[::-1] if portrait else stored)
        w, h = image.size
        corners = {"top-left": (1, 1), "top-right": (w - 2, 1), "bottom-left": (1, h - 2),
                   "bottom-right": (w - 2, h - 2)}
        for corner, xy in corners.items():
            red, _, blue = image.getpixel(xy)
            assert (red > 180 and blue < 90) if corner == red_corner else (red < 90 and blue > 180), (corner, xy)


def test_small_images_are_upscaled_with_a_note_or_refused(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    corpus.photo(folder / "tiny.png", (40, 30))
    corpus.photo(folder / "big.png", (64, 64))
    _, notes = survey(settings(folder, resolution=48), tmp_path)
    assert notes == [f"{folder / 'tiny.png'}: smaller than its 48×48 bucket (got 40×30); upscaled, so it trains "
                     f"soft. Use a larger image, or set data.small_images: refuse to stop on such images."]
    assert survey_error(folder, resolution=48, small_images="refuse") == (
        f"{folder / 'tiny.png'}: smaller than its 48×48 bucket (got 40×30). Use a larger image, lower "
        f"data.resolution, or set data.small_images: upscale.")


# --- huge images and decompression bombs -------------------------------------------------------------------------

PEAK_MEMORY = """
import resource, sys
from pathlib import Path
from yem.data import images
from yem.errors import DataError
try:
    image = images.open_image(Path(sys.argv[1]), int(sys.argv[2]))
    outcome = f"{image.width}x{image.height}"
except DataError as e:
    outcome = str(e)
per_unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * per_unit)
print(outcome)
"""


def decode_in_a_fresh_process(path: Path, min_side: int) -> tuple[int, str]:
    """Peak resident memory (bytes) of a new interpreter that decodes `path`, and the size or error it got."""
    result = subprocess.run([sys.executable, "-c", PEAK_MEMORY, str(path), str(min_side)], cwd=REPO,
                            capture_output=True, text=True, check=True)
    peak, outcome = result.stdout.splitlines()
    return int(peak), outcome


@pytest.fixture(scope="module")
def huge_images(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("huge")
    Image.new("RGB", (8000, 6000), (10, 200, 30)).save(folder / "48mp.jpg", quality=80)
    corpus.photo(folder / "small.jpg", (200, 150))
    corpus.solid_png(folder / "36mp-rgb.png", 6000, 6000, b"\x10\x20\x30", corpus.RGB)
    corpus.solid_png(folder / "36mp-rgba.png", 6000, 6000, b"\x10\x20\x30\x80", corpus.RGBA)
    # A small JPEG whose frame header claims 15000×12000 (180 MP, under the bomb limit): its scan is far too short.
    header = bytearray((folder / "small.jpg").read_bytes())
    frame = header.index(b"\xff\xc0")
    header[frame + 5:frame + 9] = (12000).to_bytes(2, "big") + (15000).to_bytes(2, "big")
    (folder / "claims-180mp.jpg").write_bytes(bytes(header))
    return {path.name: path for path in folder.iterdir()}


def test_huge_images_decode_in_bounded_memory(huge_images):
    """Memory above a small photo's decode, against the image decoded at full size (the old code used 4-5×)."""
    baseline, _ = decode_in_a_fresh_process(huge_images["small.jpg"], 64)
    full_rgb = 8000 * 6000 * 3
    peak, size = decode_in_a_fresh_process(huge_images["48mp.jpg"], 64)
    assert size == "200x150"  # libjpeg decoded it at 1/8 scale, then 5×5 blocks: short side 150 ≥ 2 × 64
    assert peak - baseline < full_rgb / 4
    peak, _ = decode_in_a_fresh_process(huge_images["claims-180mp.jpg"], 64)
    assert peak - baseline < 15000 * 12000 * 3 / 16  # (libjpeg pads the missing scan with grey: undetectable)
    peak, _ = decode_in_a_fresh_process(huge_images["36mp-rgb.png"], 64)
    assert peak - baseline < 1.5 * 6000 * 6000 * 3  # PNG has no reduced decode: one full copy, no conversions
    peak, _ = decode_in_a_fresh_process(huge_images["36mp-rgba.png"], 64)
    assert peak - baseline < 2.5 * 6000 * 6000 * 4  # plus the premultiplied copy Pillow reduces alpha through


@pytest.mark.parametrize("side", [17000, 40000])  # over the limit (Pillow warns), over twice it (Pillow raises)
def test_decompression_bombs_are_refused_from_their_header(tmp_path, side):
    path = corpus.bomb_png(tmp_path / "bomb.png", side, side)
    with pytest.raises(DataError) as caught:
        images.open_image(path, 64)
    assert str(caught.value) == (f"{path}: too large to decode safely (got over 250,000,000 pixels: a decompression "
                                 f"bomb?). Downscale it, or remove it.")


# --- names ---------------------------------------------------------------------------------------------------

NFC, NFD = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")


@pytest.mark.parametrize("names", [("a.jpg", "a.png"), ("Dog.jpg", "dog.png"), (f"{NFC}.jpg", f"{NFD}.png")])
def test_two_images_with_the_same_name_are_refused(tmp_path, names):
    folder = photos(tmp_path / "photos", *names)
    if len(list(folder.iterdir())) < 2:
        pytest.skip("this file system folds these names into one")
    first, second = sorted(folder / name for name in names)
    with pytest.raises(DataError) as caught:
        samples.discover(folder, "instance", "data.instance_dir")
    assert str(caught.value) == (f"{second}: same name as {first} (got {second.stem!r} twice, ignoring letter case and "
                                 f"how accents are encoded), so their captions and caches would collide. Rename one "
                                 f"of them.")


def test_names_with_spaces_and_non_ascii_survive_into_the_manifests(tmp_path):
    folder = photos(tmp_path / "photos", "my dog 🐶.png", f"{NFD} au lait.jpg")
    (folder / f"{NFD} au lait.txt").write_text("a sks dog, crème colour", encoding="utf-8")
    samples, _ = survey(settings(folder), tmp_path)
    assert sorted(s.id for s in samples) == sorted(["instance/my dog 🐶", f"instance/{NFC} au lait"])  # ids in NFC
    manifest = caption_manifest(samples, tmp_path)
    atomic.write_json(tmp_path / "captions.json", manifest)
    assert json.loads((tmp_path / "captions.json").read_text(encoding="utf-8")) == {
        "captions": {f"instance/{NFC} au lait": "a sks dog, crème colour", "instance/my dog 🐶": None},
        "files": {f"instance/{NFC} au lait": f"photos/{NFD} au lait.txt"}}


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS file systems only store UTF-8 names")
def test_a_file_name_that_is_not_utf8_is_refused(tmp_path):
    folder = photos(tmp_path / "photos", "fine.png")
    corpus.photo(folder / os.fsdecode(b"caf\xe9.png"), format="PNG")
    with pytest.raises(DataError) as caught:
        samples.discover(folder, "instance", "data.instance_dir")
    assert str(caught.value) == f"{folder}/caf\\xe9.png: file name is not valid UTF-8. Rename it."


def test_symlinks_to_files_are_followed_and_broken_ones_named(tmp_path):
    elsewhere = photos(tmp_path / "elsewhere", "real.png")
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "linked.png").symlink_to(elsewhere / "real.png")
    (folder / "album").symlink_to(elsewhere, target_is_directory=True)
    (folder / "notes").symlink_to(tmp_path / "gone")
    found = samples.discover(folder, "instance", "data.instance_dir")
    assert [(s.id, s.path) for s in found.samples] == [("instance/linked", folder / "linked.png")]
    assert sorted(found.notes) == [f"{folder / 'album'}: skipped, a folder (images in subfolders are not used). "
                                   f"Move them up to use them.",
                                   f"{folder / 'notes'}: broken link (to {tmp_path / 'gone'}); skipped."]
    (folder / "dangling.jpg").symlink_to(tmp_path / "deleted.jpg")
    (folder / "loop.png").symlink_to("loop.png")
    lines = survey_error(folder).splitlines()
    assert lines[1:] == [f"  {folder / 'dangling.jpg'}: broken link (to {tmp_path / 'deleted.jpg'}). Fix the link or "
                         f"remove it.",
                         f"  {folder / 'loop.png'}: broken link (to loop.png). Fix the link or remove it."]


# --- captions --------------------------------------------------------------------------------------------------

def test_captions_are_read_whitespace_collapsed_with_bom_utf16_and_any_case(tmp_path):
    folder = photos(tmp_path / "photos", "a.png", "b.png", "c.png", "d.png")
    (folder / "a.txt").write_text("  a photo of\n sks   dog \n", encoding="utf-8")
    (folder / "b.txt").write_text(" \n\t", encoding="utf-8")
    (folder / "c.txt").write_bytes("café dog".encode("utf-8-sig"))
    (folder / "D.TXT").write_bytes("dog on grass".encode("utf-16"))  # Windows Notepad "Unicode": BOM + UTF-16LE
    found = samples.discover(folder, "instance", "data.instance_dir")
    by_id = {s.id: s for s in found.samples}
    assert {k: s.caption for k, s in by_id.items()} == {"instance/a": "a photo of sks dog", "instance/b": None,
                                                         "instance/c": "café dog", "instance/d": "dog on grass"}
    assert by_id["instance/d"].caption_file == folder / "D.TXT" and by_id["instance/b"].caption_file is None
    assert found.notes == [f"{folder / 'b.txt'}: empty caption; its image uses prompts.instance."]


def test_captions_that_are_not_utf8_text_are_refused_together(tmp_path):
    folder = photos(tmp_path / "photos", "latin.png", "wide.png")
    (folder / "latin.txt").write_bytes("café".encode("latin-1"))
    (folder / "wide.txt").write_bytes("dog".encode("utf-16-le"))  # no BOM
    lines = str(pytest.raises(DataError, samples.discover, folder, "instance", "data.instance_dir").value).splitlines()
    assert lines == ["2 problems with the training data; fix each, then rerun:",
                     f"  {folder / 'latin.txt'}: caption is not UTF-8 text (got byte b'\\xe9' at offset 3). Save it "
                     f"as UTF-8.",
                     f"  {folder / 'wide.txt'}: caption is not UTF-8 text (got NUL characters: UTF-16?). Save it as "
                     f"UTF-8."]


def test_a_caption_longer_than_the_token_limit_is_truncated_with_a_warning_naming_its_file(tmp_path, tiny_model_dir):
    project = small_project(tmp_path, validation=["a photo of sks dog", "a sks dog " * 20])
    (project / "build").mkdir()
    cpu_hardware().save(project / "build" / "preflight.json")
    long_caption = "a photo of sks dog sitting on a long red sofa in a sunny living room " * 3
    (project / "build" / "captions.json").write_text(json.dumps(
        {"captions": {"instance/rex": long_caption, "instance/max": None},
         "files": {"instance/rex": "data/instance/rex.txt"}}))
    from stages.encode import main

    result = CliRunner().invoke(main, ["--params", str(project / "params.yaml"), "--hardware",
                                       str(project / "build/preflight.json"), "--captions",
                                       str(project / "build/captions.json"), "--out", str(project / "build/embeds"),
                                       "--log", str(project / "logs/encode.json")])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2
    assert warnings[0].startswith("warning: data/instance/rex.txt: text too long, its end is ignored (got CLIP-L ")
    assert "77 kept; CLIP-G" in warnings[0] and "; T5 " in warnings[0]
    assert warnings[0].endswith("Shorten it or raise encode.max_sequence_length (at most 512).")
    assert warnings[1].startswith("warning: prompts.validation[1]: text too long")


# --- params ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("old, new, problem", [
    ("encode:\n  use_t5: true", "encode: 5\nunused:\n  use_t5: true", "encode: expected a mapping of keys"),
    ("  validation: null ", "  validation: a photo of sks dog ",
     "prompts.validation: expected a list of (a string) or null (got 'a photo of sks dog')."),
    ("  validation: null ", "  validation: [42] ", "prompts.validation: expected a list of (a string) or null"),
    ("  rank: 4 ", "  rank: 4\n  rank: 8 ", "found duplicate key \"rank\""),
    ("resolution: 128 ", "resolution: 100 ", "data.resolution: must be a multiple of 16 (latent ×8, patch ×2) "
                                             "(got 100). Use 96 or 112."),
    ("learning_rate: 0.001", "learning_rate: fast", "train.learning_rate: expected a number (got 'fast')."),
    ("  rank: 4", "\trank: 4", "not valid YAML")])
def test_params_problems_missing_from_test_params(tmp_path, old, new, problem):
    text = (REPO / "params.yaml").read_text()
    assert old in text
    path = tmp_path / "params.yaml"
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(ParamsError) as caught:
        load_params(path)
    assert any(problem in p for p in caught.value.problems), caught.value.problems


# --- stages: exit 1, one line, earlier outputs intact ------------------------------------------------------------

def test_the_preflight_stage_refuses_bad_input_in_one_line_and_keeps_its_outputs(tmp_path):
    project = small_project(tmp_path / "project")
    assert preflight_in_process(project).exit_code == 0
    before = snapshot(project / "build")
    assert set(before) == {"preflight.json", "images.json", "captions.json"}
    broken = project / "data/instance/dog1.png"
    corpus.truncated(broken, broken, keep=0.6)
    result = preflight_stage(project)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"Error: {broken}: cannot decode the image (got image file is truncated). "
                                          f"The file is truncated or corrupt: re-export it, or remove it."]
    (project / "params.yaml").write_text((project / "params.yaml").read_text().replace("  rank: 4", "  rnak: 4"))
    result = preflight_in_process(project)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.splitlines()[1:] == [f"  {project / 'params.yaml'} train.rnak: unknown key. Did you mean "
                                              f"'train.rank'?", f"  {project / 'params.yaml'} train.rank: missing. "
                                              f"Add it (expected an integer)."]
    assert snapshot(project / "build") == before


def test_the_latents_stage_keeps_its_previous_cache_when_an_image_changed_under_it(tmp_path, tiny_model_dir):
    from stages.latents import main

    project, args, before = latents_cached(tmp_path / "project")
    changed = project / "data/instance/dog2.png"  # the last one: dog0 and dog1 were already re-encoded
    toy_subject(7, (80, 72)).save(changed)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert "Traceback" not in result.output  # above the error: only the progress bar
    assert result.stderr.splitlines()[-1] == f"Error: {changed}: changed after preflight checked it. Rerun: dvc repro."
    assert snapshot(project / "build") == before
    assert sorted(p.name for p in (project / "build").iterdir()) == ["captions.json", "images.json", "latents",
                                                                     "preflight.json"]  # no staging left behind
