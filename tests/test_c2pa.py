"""C2PA: keys made once and atomically, every written image signed, c2pa's own reader agrees
(signature valid, binding intact, signer untrusted), a pixel edit breaks the binding, MP4 too."""

from __future__ import annotations

import json
import multiprocessing
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffswap_igfi.cli import main
from diffswap_igfi.errors import ConfigError, OutputError
from diffswap_igfi.io.samples import sample_path
from diffswap_igfi.provenance.c2pa_sign import read_c2pa, sign_file
from diffswap_igfi.provenance.keys import (
    CONFIG_ENV,
    config_dir,
    init_keys,
    make_certificate_chain,
    signing_keys,
)
from diffswap_igfi.provenance.metadata import (
    COMPOSITE_SYNTHETIC,
    COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA,
    read_metadata,
)
from diffswap_igfi.provenance.write import write_synthetic_image


def astronaut() -> np.ndarray:
    return np.asarray(Image.open(sample_path("astronaut")).convert("RGB"))


def c2pa_reader_json(path: Path) -> dict:
    import c2pa

    with open(path, "rb") as handle, c2pa.Reader("image/png" if path.suffix == ".png"
                                                  else None, handle) as reader:
        return json.loads(reader.json())


def test_tests_never_touch_the_real_config_folder():
    # conftest.py points the config folder at a temporary one for the whole session.
    assert config_dir() == Path(os.environ[CONFIG_ENV])
    assert config_dir() != Path.home() / ".config" / "diffswap-igfi"


def _race(folder: str, queue) -> None:
    keys = init_keys(Path(folder))
    queue.put((keys.created, keys.chain.read_bytes(), keys.key.read_bytes()))


def test_concurrent_first_use_makes_exactly_one_key(tmp_path):
    # fork: the children only run `cryptography` and file system calls, and start in ms.
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    workers = [context.Process(target=_race, args=(str(tmp_path), queue)) for _ in range(4)]
    for w in workers:
        w.start()
    results = [queue.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(timeout=60)
    assert sum(created for created, _, _ in results) <= 1  # the rest found the winner's keys
    assert len({(chain, key) for _, chain, key in results}) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c2pa"]  # no staging left over
    assert oct((tmp_path / "c2pa" / "signer.key").stat().st_mode & 0o777) == "0o600"


def test_init_keeps_existing_keys_unless_forced(tmp_path):
    first = init_keys(tmp_path)
    assert first.created and first.chain.read_bytes().count(b"BEGIN CERTIFICATE") == 2
    again = init_keys(tmp_path)
    assert not again.created and again.key.read_bytes() == first.key.read_bytes()
    old_key = first.key.read_bytes()
    forced = init_keys(tmp_path, force=True)
    assert forced.created and forced.key.read_bytes() != old_key
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("c2pa.old-")]
    assert len(kept) == 1 and (kept[0] / "signer.key").read_bytes() == old_key


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp", ".tif"])
def test_every_written_image_is_signed_and_checks_out(tmp_path, suffix):
    rgb = astronaut()
    out = write_synthetic_image(tmp_path / f"swap{suffix}", rgb, None,
                                digital_source_type=COMPOSITE_SYNTHETIC, engine="geometric",
                                parent_path=sample_path("astronaut"))
    report = read_c2pa(out)
    assert report.present and report.signature_ok and report.binding_ok
    assert report.trusted is False and report.failures == ["signingCredential.untrusted"]
    assert report.actions == ["c2pa.opened", "c2pa.edited"]
    assert report.digital_source_type == COMPOSITE_SYNTHETIC and report.engine == "geometric"
    assert report.parent == "astronaut.png" and report.generator.startswith("diffswap-igfi ")
    assert "signed by an untrusted local certificate" in report.summary()
    # Our XMP/EXIF metadata survives the signing, and nothing else is left beside the output.
    assert read_metadata(out).synthetic
    assert [p.name for p in tmp_path.iterdir()] == [out.name]
    # Hash-only ingredient: no thumbnail of the people, of the result or of the target.
    store = c2pa_reader_json(out)
    manifest = store["manifests"][store["active_manifest"]]
    assert "thumbnail" not in manifest
    assert all("thumbnail" not in ingredient for ingredient in manifest["ingredients"])


def test_without_a_parent_the_first_action_is_created(tmp_path):
    out = write_synthetic_image(tmp_path / "grid.png", astronaut(), None,
                                digital_source_type=COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA,
                                engine="diffusion")
    report = read_c2pa(out)
    assert report.actions == ["c2pa.created", "c2pa.edited"] and report.parent is None
    assert report.digital_source_type == COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA
    assert report.signature_ok and report.binding_ok


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        chunks.append((data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]))
        pos += 12 + length
    return chunks


def _png(chunks: list[tuple[bytes, bytes]]) -> bytes:
    out = b"\x89PNG\r\n\x1a\n"
    for kind, body in chunks:
        out += struct.pack(">I", len(body)) + kind + body
        out += struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    return out


def test_a_one_pixel_edit_after_signing_breaks_the_binding(tmp_path, capsys):
    rgb = astronaut()
    signed = write_synthetic_image(tmp_path / "swap.png", rgb, None,
                                   digital_source_type=COMPOSITE_SYNTHETIC, engine="geometric")
    # Change one pixel, keep the manifest chunk exactly as signed.
    edited_rgb = np.asarray(Image.open(signed).convert("RGB")).copy()
    edited_rgb[100, 100, 0] ^= 1
    fresh = tmp_path / "fresh.png"
    Image.fromarray(edited_rgb).save(fresh)
    manifest_chunks = [c for c in _png_chunks(signed.read_bytes()) if c[0] == b"caBX"]
    assert len(manifest_chunks) == 1
    chunks = _png_chunks(fresh.read_bytes())
    edited = tmp_path / "edited.png"
    edited.write_bytes(_png(chunks[:1] + manifest_chunks + chunks[1:]))
    report = read_c2pa(edited)
    assert report.present and report.signature_ok and report.binding_ok is False
    assert "assertion.dataHash.mismatch" in report.failures
    assert "binding BROKEN" in report.summary()
    assert main(["verify", str(edited)]) == 0  # still reported as synthetic (other markers)
    assert "binding BROKEN" in capsys.readouterr().out


def test_bmp_has_no_room_for_a_manifest_but_is_still_written(tmp_path):
    out = write_synthetic_image(tmp_path / "swap.bmp", astronaut(), None,
                                digital_source_type=COMPOSITE_SYNTHETIC, engine="geometric")
    assert out.is_file() and not read_c2pa(out).present
    with pytest.raises(OutputError):
        sign_file(out, digital_source_type=COMPOSITE_SYNTHETIC, engine="geometric")


def test_an_organisation_key_is_used_when_given(tmp_path):
    chain, key, _ = make_certificate_chain("Example Newsroom signer")
    (tmp_path / "org.pem").write_bytes(chain)
    (tmp_path / "org.key").write_bytes(key)
    out = write_synthetic_image(tmp_path / "swap.jpg", astronaut(), None,
                                digital_source_type=COMPOSITE_SYNTHETIC, engine="geometric",
                                c2pa_cert=tmp_path / "org.pem", c2pa_key=tmp_path / "org.key")
    report = read_c2pa(out)
    assert report.signer == "Example Newsroom signer" and report.signature_ok
    with pytest.raises(ConfigError):
        signing_keys(tmp_path / "org.pem", None)
    (tmp_path / "bad.key").write_text("not a key\n")
    with pytest.raises(ConfigError):
        write_synthetic_image(tmp_path / "swap2.jpg", astronaut(), None,
                              digital_source_type=COMPOSITE_SYNTHETIC, engine="geometric",
                              c2pa_cert=tmp_path / "org.pem", c2pa_key=tmp_path / "bad.key")
    assert not (tmp_path / "swap2.jpg").exists()


def _tiny_mp4(path: Path, frames: int = 6) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=6)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for i in range(frames):
            image = np.full((64, 64, 3), 40 * i % 255, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_sign_file_signs_an_mp4_in_place_atomically(tmp_path):
    video = tmp_path / "clip.mp4"
    _tiny_mp4(video)
    sign_file(video, digital_source_type=COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA,
              engine="diffusion", watermark_payload="0123abcd")
    report = read_c2pa(video)
    assert report.signature_ok and report.binding_ok and report.trusted is False
    assert report.watermark_payload == "0123abcd" and report.engine == "diffusion"
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]
    import av

    with av.open(str(video)) as container:  # still a playable video
        assert sum(1 for _ in container.decode(video=0)) == 6


def test_keys_command(capsys):
    assert main(["keys", "init"]) == 0
    out = capsys.readouterr().out
    assert "C2PA signing keys" in out and str(config_dir()) in out
    assert main(["keys", "show"]) == 0
    assert "sha256:" in capsys.readouterr().out


def test_swap_signs_with_the_organisation_key_from_the_command_line(tmp_path, capsys):
    chain, key, _ = make_certificate_chain("Example Newsroom signer")
    (tmp_path / "org.pem").write_bytes(chain)
    (tmp_path / "org.key").write_bytes(key)
    out = tmp_path / "swap.jpg"
    assert main(["swap", "-s", "sample:grace_hopper", "-t", "sample:astronaut", "-o", str(out),
                 "--quiet", "--c2pa-cert", str(tmp_path / "org.pem"),
                 "--c2pa-key", str(tmp_path / "org.key")]) == 0
    report = read_c2pa(out)
    assert report.signer == "Example Newsroom signer" and report.binding_ok
    assert report.actions == ["c2pa.opened", "c2pa.edited"] and report.parent == "astronaut.png"
    assert main(["swap", "-s", "sample:grace_hopper", "-t", "sample:astronaut", "-o",
                 str(tmp_path / "other.jpg"), "--c2pa-cert", str(tmp_path / "org.pem")]) == 2
    assert "--c2pa-key" in capsys.readouterr().err
    assert not (tmp_path / "other.jpg").exists()
