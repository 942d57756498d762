"""The 3DDFA_V2 geometry backend: BFM shape and expression regressed by a MobileNet (ONNX).

Files (one local folder, no pickle at load time):
- ``mb1_120x120.onnx``: 3DDFA_V2's regressor, input ``[1,3,120,120]``, output ``[1,62]``. Get it
  from 3DDFA_V2's ``weights/readme.md`` (pre-converted) or by running its demo with ``--onnx``,
  which exports ``weights/mb1_120x120.onnx`` from ``mb1_120x120.pth``.
- ``bfm_68.safetensors`` (or ``bfm_68.npz``): ``u_base [204]``, ``w_shp_base [204,S]``,
  ``w_exp_base [204,E]`` (the BFM restricted to its 68 keypoints, x,y,z interleaved per point, as
  in 3DDFA_V2) and ``param_mean``, ``param_std [12+S+E]``. ``convert_3ddfa_v2`` writes it from
  3DDFA_V2's ``configs/bfm_noneck_v3.pkl`` and ``configs/param_mean_std_62d_120x120.pkl``.

Conventions, as 3DDFA_V2 defines them. Params = 12 pose (a 3x4 matrix ``P = [s*R | offset]``,
row-major) + S shape + E expression, normalised by ``param_mean``/``param_std``. The regressor
sees a square roi cropped (zero-padded) from the BGR photo, resized to 120 with bilinear
interpolation and scaled by ``(v - 127.5) / 128``. The 68 keypoints ``P @ (u + W a) + offset``
land in 1-based crop pixels with y up: a crop pixel is ``(x - 1, 120 - y)``, then scaled by
``roi_width / 120`` and shifted by the roi corner. BFM space is x right, y up, z towards the
camera (the mean pose is a positive diagonal), which is also ours, so ``R`` carries over; when
the regressed rows of ``P`` are not exactly orthogonal with equal norms we take the nearest
scaled orthonormal pair (polar decomposition), the third row being their cross product.

The roi. 3DDFA_V2 crops either from a detector box or, when tracking, from 68 landmarks of the
previous frame (``crop_policy='landmark'``): the square around the landmarks' box, of side the
diagonal of that box's enclosing square. We have landmarks, so we take the 68-point equivalents
from MediaPipe's mesh (``MESH_TO_68``) and use that rule, rounding the box to whole pixels so the
crop and the mapping back to the photo use the same box.
"""

from __future__ import annotations

import argparse
import math
import pickle
import shutil
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np

from diffswap_igfi.errors import (ConfigError, DiffSwapError, InputError,
                                  ModelNotFoundError)
from diffswap_igfi.faces.record import FaceRecord
from diffswap_igfi.geometry.base import GeometryBackend, GeometryFit, project_weak_perspective

ONNX_NAME = "mb1_120x120.onnx"
BASIS_NAMES = ("bfm_68.safetensors", "bfm_68.npz")
BFM_PICKLE = "bfm_noneck_v3.pkl"
PARAM_PICKLE = "param_mean_std_62d_120x120.pkl"
POSE_DIM = 12
HOW_TO_GET = ("get mb1_120x120.onnx, bfm_noneck_v3.pkl and param_mean_std_62d_120x120.pkl from "
              "the 3DDFA_V2 release (github.com/cleardusk/3DDFA_V2) and convert them with "
              "`python -m diffswap_igfi.geometry.tddfa SRC OUT --allow-pickle`")

# MediaPipe mesh vertices closest to the 68 iBUG/300W points (the BFM keypoint order): jaw 0-16,
# brows 17-26, nose 27-35, eyes 36-47, outer lips 48-59, inner lips 60-67, image-left first.
MESH_TO_68 = (
    127, 234, 93, 132, 58, 136, 150, 176, 152, 400, 379, 365, 288, 361, 323, 454, 356,
    70, 63, 105, 66, 107, 336, 296, 334, 293, 300,
    168, 197, 5, 4, 75, 97, 2, 326, 305,
    33, 160, 158, 133, 153, 144, 362, 385, 387, 263, 373, 380,
    61, 39, 37, 0, 267, 269, 291, 405, 314, 17, 84, 181,
    78, 82, 13, 312, 308, 317, 14, 87,
)


def roi_box_from_landmarks(points: np.ndarray) -> np.ndarray:
    """3DDFA_V2's landmark roi: points [K,2] pixels -> [4] float64 (x0, y0, x1, y1), square,
    centred on the points' box, side = diagonal of the square enclosing that box; rounded."""
    pts = np.asarray(points, np.float64)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    centre = (lo + hi) / 2
    side = (hi - lo).max() * math.sqrt(2.0)
    return np.round(np.concatenate([centre - side / 2, centre + side / 2]))


def crop_roi(image: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The integer box (x0, y0, x1, y1) of image [H,W,C], zero where it leaves the image."""
    x0, y0, x1, y1 = (int(v) for v in np.round(box))
    out = np.zeros((y1 - y0, x1 - x0) + image.shape[2:], image.dtype)
    h, w = image.shape[:2]
    sx, sy, ex, ey = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if ex > sx and ey > sy:
        out[sy - y0:ey - y0, sx - x0:ex - x0] = image[sy:ey, sx:ex]
    return out


def load_basis(folder: Path) -> dict[str, np.ndarray]:
    """The arrays of ``bfm_68.safetensors`` / ``bfm_68.npz`` as float64; u_base as [68,3]."""
    for name in BASIS_NAMES:
        path = folder / name
        if path.is_file():
            break
    else:
        raise ModelNotFoundError(f"3DDFA_V2 basis {folder / BASIS_NAMES[0]} not found; "
                                 f"{HOW_TO_GET}")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    else:
        from safetensors.numpy import load_file

        arrays = load_file(str(path))
    keys = ("u_base", "w_shp_base", "w_exp_base", "param_mean", "param_std")
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise ConfigError(f"{path} lacks {', '.join(missing)}; re-run the converter")
    out = {k: np.asarray(arrays[k], np.float64) for k in keys}
    out["u_base"] = out["u_base"].reshape(-1, 3)
    n, s, e = len(out["u_base"]), out["w_shp_base"].shape[-1], out["w_exp_base"].shape[-1]
    if (out["w_shp_base"].shape[0] != 3 * n or out["w_exp_base"].shape[0] != 3 * n
            or out["param_mean"].shape != (POSE_DIM + s + e,)
            or out["param_std"].shape != (POSE_DIM + s + e,)):
        shapes = {k: v.shape for k, v in out.items()}
        raise ConfigError(f"{path}: inconsistent array shapes {shapes}; re-run the converter")
    return out


class TDDFABackend(GeometryBackend):
    """3DDFA_V2 (MobileNet regressor + BFM 68 keypoints): S = 40, E = 10 with the release files.

    folder: local folder with the ONNX regressor and the converted basis (see module doc).
    providers: onnxruntime execution providers (CPU by default).
    """

    name = "3ddfa_v2"
    num_landmarks = 68

    def __init__(self, folder, *, onnx_name: str = ONNX_NAME, providers=None) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ModelNotFoundError(f"3DDFA_V2 folder {self.folder} not found; {HOW_TO_GET}")
        onnx_path = self.folder / onnx_name
        if not onnx_path.is_file():
            raise ModelNotFoundError(f"3DDFA_V2 regressor {onnx_path} not found; {HOW_TO_GET}")
        basis = load_basis(self.folder)
        self.u_base = basis["u_base"]  # [68,3]
        self.w_shp, self.w_exp = basis["w_shp_base"], basis["w_exp_base"]  # [204,S], [204,E]
        self.param_mean, self.param_std = basis["param_mean"], basis["param_std"]
        self.shape_dim, self.exp_dim = self.w_shp.shape[1], self.w_exp.shape[1]

        import onnxruntime

        self.session = onnxruntime.InferenceSession(
            str(onnx_path), providers=list(providers or ["CPUExecutionProvider"]))
        inp = self.session.get_inputs()[0]
        self._input_name = inp.name
        size = inp.shape[-1]
        #: side of the square the regressor sees (120 for the release models)
        self.input_size = int(size) if isinstance(size, int) else 120

    # -- regression --------------------------------------------------------------------------
    def roi_box(self, face: FaceRecord) -> np.ndarray:
        """[4] float64 (x0, y0, x1, y1) photo pixels, whole numbers: the square the net sees."""
        return roi_box_from_landmarks(face.points[list(MESH_TO_68)])

    def preprocess(self, rgb: np.ndarray, box: np.ndarray) -> np.ndarray:
        """rgb [H,W,3] uint8 -> the regressor's input [1,3,S,S] float32, BGR, (v - 127.5) / 128."""
        crop = crop_roi(np.ascontiguousarray(rgb[..., ::-1]), box)
        size = self.input_size
        crop = cv2.resize(crop, (size, size), interpolation=cv2.INTER_LINEAR)
        return ((crop.astype(np.float32).transpose(2, 0, 1)[None] - 127.5) / 128.0)

    def regress(self, rgb: np.ndarray, face: FaceRecord) -> tuple[np.ndarray, np.ndarray]:
        """(params [12+S+E] float64 de-normalised, roi box [4]) for one face."""
        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise InputError(f"expected an [H,W,3] uint8 RGB photo, got {rgb.shape} {rgb.dtype}")
        box = self.roi_box(face)
        if box[2] - box[0] < 2:
            raise InputError(f"the face's landmarks span under 2 pixels (roi {box.tolist()})")
        out = self.session.run(None, {self._input_name: self.preprocess(rgb, box)})[0]
        out = np.asarray(out, np.float64).reshape(-1)
        if out.shape != self.param_mean.shape:
            raise ConfigError(f"the regressor outputs {out.size} params, the basis expects "
                              f"{self.param_mean.size}; use the ONNX and basis of one model")
        return out * self.param_std + self.param_mean, box

    # -- explanation -------------------------------------------------------------------------
    def fit(self, rgb: np.ndarray, face: FaceRecord) -> GeometryFit:
        """Regress the BFM parameters of ``face`` in ``rgb`` ([H,W,3] uint8 RGB); explain them."""
        params, box = self.regress(rgb, face)
        return self.fit_params(params, box)

    def fit_params(self, params: np.ndarray, box: np.ndarray) -> GeometryFit:
        """De-normalised 3DDFA_V2 params [12+S+E] regressed in roi ``box`` -> GeometryFit.

        3DDFA_V2 maps a keypoint X to the photo by ``x = k (P0.X + o0 - 1) + x0`` and
        ``y = k (size - P1.X - o1) + y0`` with ``k = roi side / size``; with ``P[:2,:3] = c R2``
        that is ours with scale ``k c`` and translation ``(k (o0 - 1) + x0, k (size - o1) + y0)``.
        """
        params = np.asarray(params, np.float64).reshape(-1)
        pose = params[:POSE_DIM].reshape(3, 4)
        shape = params[POSE_DIM:POSE_DIM + self.shape_dim].astype(np.float32)
        expression = params[POSE_DIM + self.shape_dim:].astype(np.float32)
        u, sig, vt = np.linalg.svd(pose[:2, :3], full_matrices=False)
        rows = u @ vt  # nearest pair of orthonormal rows (polar decomposition)
        rotation = np.vstack([rows, np.cross(rows[0], rows[1])])
        x0, y0, x1, y1 = np.asarray(box, np.float64)
        size = self.input_size
        k = ((x1 - x0) + (y1 - y0)) / (2 * size)  # the roi is square; average if it is not
        scale = float(k * sig.mean())
        translation = np.array([k * (pose[0, 3] - 1) + x0, k * (size - pose[1, 3]) + y0])
        landmarks = project_weak_perspective(self.model_points(shape, expression), rotation, scale,
                                             translation)
        return GeometryFit(self.name, shape, expression, rotation, scale, translation, landmarks)

    def model_points(self, shape: np.ndarray, expression: np.ndarray) -> np.ndarray:
        """[68,3] float64 BFM keypoints ``u + W_shp @ shape + W_exp @ expression`` (model space)."""
        flat = (self.w_shp @ np.asarray(shape, np.float64).reshape(-1)
                + self.w_exp @ np.asarray(expression, np.float64).reshape(-1))
        return self.u_base + flat.reshape(-1, 3)


# -- conversion of the original release files --------------------------------------------------
def _find(src: Path, name: str) -> Path:
    """``name`` in src or in a 3DDFA_V2 checkout's configs/ or weights/."""
    for path in (src / name, src / "configs" / name, src / "weights" / name):
        if path.is_file():
            return path
    raise ModelNotFoundError(f"{name} not found in {src} (nor its configs/, weights/); "
                             f"{HOW_TO_GET}")


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        obj = pickle.load(f)  # noqa: S301 -- only with allow_pickle, after the warning
    if not isinstance(obj, dict):
        raise ConfigError(f"{path} holds a {type(obj).__name__}, expected 3DDFA_V2's dict")
    return obj


def convert_3ddfa_v2(src_dir, out_dir, *, allow_pickle: bool = False,
                     onnx_name: str = ONNX_NAME, bfm_name: str = BFM_PICKLE,
                     shape_dim: int = 40, exp_dim: int = 10) -> Path:
    """Write ``bfm_68.safetensors`` and copy the ONNX from 3DDFA_V2's release files.

    src_dir: a 3DDFA_V2 checkout or a flat folder with ``bfm_noneck_v3.pkl`` (dict: ``u [3N,1]``,
    ``w_shp [3N,>=S]``, ``w_exp [3N,>=E]``, ``keypoints [204]`` indices into the x,y,z-interleaved
    ``u``), ``param_mean_std_62d_120x120.pkl`` (dict: ``mean``, ``std [62]``) and ``onnx_name``.
    Returns out_dir. Unpickling runs code from the file, hence ``allow_pickle``.
    """
    if not allow_pickle:
        raise ConfigError("3DDFA_V2's release files are pickles, which can run code when loaded; "
                          "pass allow_pickle=True (--allow-pickle) for files from a trusted source")
    src, out = Path(src_dir), Path(out_dir)
    bfm_path, param_path, onnx_path = (_find(src, n) for n in (bfm_name, PARAM_PICKLE, onnx_name))
    warnings.warn(f"unpickling {bfm_path.name} and {param_path.name} runs code from those files; "
                  "only do this with files from a trusted source", UserWarning, stacklevel=2)
    bfm, norm = _unpickle(bfm_path), _unpickle(param_path)
    try:
        u = np.asarray(bfm["u"], np.float32).reshape(-1)
        w_shp = np.asarray(bfm["w_shp"], np.float32)[:, :shape_dim]
        w_exp = np.asarray(bfm["w_exp"], np.float32)[:, :exp_dim]
        keys = np.asarray(bfm["keypoints"], np.int64).reshape(-1)
        mean = np.asarray(norm["mean"], np.float32).reshape(-1)
        std = np.asarray(norm["std"], np.float32).reshape(-1)
    except KeyError as exc:
        raise ConfigError(f"3DDFA_V2 file lacks key {exc}; is it bfm_noneck_v3 / param_mean_std?")
    if len(keys) == 68:  # vertex indices rather than coordinate indices
        keys = (3 * keys[:, None] + np.arange(3)).reshape(-1)
    if len(mean) != POSE_DIM + w_shp.shape[1] + w_exp.shape[1] or len(std) != len(mean):
        raise ConfigError(f"{param_path.name} has {len(mean)} params, the BFM gives "
                          f"{POSE_DIM}+{w_shp.shape[1]}+{w_exp.shape[1]}")
    arrays = {"u_base": u[keys], "w_shp_base": w_shp[keys], "w_exp_base": w_exp[keys],
              "param_mean": mean, "param_std": std}
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(out / BASIS_NAMES[0]),
              metadata={"source": "3DDFA_V2 " + bfm_path.name, "layout": "xyz interleaved"})
    if onnx_path.resolve() != (out / onnx_name).resolve():
        shutil.copyfile(onnx_path, out / onnx_name)
    return out


def main(argv=None) -> None:
    """``python -m diffswap_igfi.geometry.tddfa SRC OUT --allow-pickle``."""
    parser = argparse.ArgumentParser(description="Convert 3DDFA_V2 release files to a folder "
                                     "TDDFABackend loads without pickle.")
    parser.add_argument("src", help="3DDFA_V2 checkout (configs/, weights/) or flat folder")
    parser.add_argument("out", help="folder to write")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="unpickle the release files (only for files from a trusted source)")
    parser.add_argument("--onnx-name", default=ONNX_NAME)
    args = parser.parse_args(argv)
    try:
        out = convert_3ddfa_v2(args.src, args.out, allow_pickle=args.allow_pickle,
                               onnx_name=args.onnx_name)
    except DiffSwapError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
