"""How close to the source any swap confined to the face oval gets, on the shipped photos.

The geometric engine with everything that keeps target pixels inside the mesh oval turned off:
the source's mesh texture pasted as it is (no tone match), over the full forehead, with the
source's own eyes and mouth interior, no skin check, alpha blending, shape transfer on. What is
still the target's is outside the oval (hair, ears, head, background). A diagnostic, not a
setting anyone should use: faces come out in the source's colours.

Run: python bench/ceiling_geometric_identity.py   (about half a minute on 2 idle cores)
"""

from __future__ import annotations

import eval_geometric_quality as quality

from diffswap_igfi.engines import geometric
from diffswap_igfi.eval.recognizer import DlibRecognizer
from diffswap_igfi.faces.detect import FaceDetector
from diffswap_igfi.io.images import load_image
from diffswap_igfi.io.samples import sample_path


def raw_texture(source, target, *args, **kwargs):
    """No tone match: the warped source texture as it is."""
    return source


def main() -> None:
    geometric.transfer_color = raw_texture
    geometric.FOREHEAD_TOP_CM = 100.0  # the whole forehead, up to the top of the mesh
    geometric.mesh_topology.cache_clear()
    geometric.VALID_GAIN = 1e3  # full alpha wherever any source texture is seen
    engine = geometric.GeometricSwapper(keep_eyes="never", keep_mouth_interior="never",
                                        skin_check=False, blend="alpha", shape_transfer=1.0)
    photos = {n: load_image(sample_path(n)).rgb for n in quality.NAMES}
    with FaceDetector() as detector:
        faces = {n: detector.detect(photos[n]) for n in quality.NAMES}
        figures, _, _ = quality.evaluate(engine, photos, faces, detector, DlibRecognizer(),
                                         log=False)
    print(quality.table({"raw source texture over the whole oval": figures}))


if __name__ == "__main__":
    main()
