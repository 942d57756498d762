"""The geometric swap engine: the embedded default that runs anywhere, with no trained weights.

A 3D-aware texture transfer on MediaPipe's 478-point mesh. The source face's texture is carried
onto the target's mesh triangle by triangle (the mesh's own triangles, painted nearest-last so a
turned head's nose hides what it hides). Each source triangle counts only as far as it is
visible in the source photo (facing the camera, not hidden by nearer ones); what the source does
not show is taken from the mirrored triangle on the other side of the face (the mesh is left/right
symmetric), and what neither shows stays the target's. Nothing is ever sampled outside the
source's mesh, so no source background reaches the result.

The texture is then relit (second-order spherical harmonics fitted on mesh normals, target
lighting over source lighting) and colour matched region by region in Lab, and blended in under a
mask that stays inside the target's face oval, leaving the target's mouth interior and eyes
(teeth, tongue, gaze) and any user-given occlusion mask to the target. Pixels where the mask is
zero are the target's, bit for bit.

All of this runs at a bounded working resolution (the face scaled to ``work_iod`` pixels between
the eyes, never up); only the final composite runs at the photo's resolution, so the cost of a
swap hardly grows with the size of the face.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from diffswap_igfi.conditions.source import Source
from diffswap_igfi.errors import InputError
from diffswap_igfi.faces import masks, mesh, skin, style, topology
from diffswap_igfi.faces.blend import composite, laplacian_blend, poisson_blend
from diffswap_igfi.faces.features import OPEN_MOUTH, align_irises, eye_opening, mouth_opening
from diffswap_igfi.faces.frame import WorkFrame, work_frame
from diffswap_igfi.faces.lighting import (fit_sh, relative_shading, rgb_to_lab, sample,
                                          transfer_color)
from diffswap_igfi.faces.record import FaceRecord
from diffswap_igfi.geometry import reshape
from diffswap_igfi.geometry.canonical import canonical_face
from diffswap_igfi.provenance.metadata import COMPOSITE_SYNTHETIC

BLENDS = ("laplacian", "poisson", "alpha")
DOMAINS = ("auto", "photo", "stylized")
N = topology.NUM_MESH_POINTS


@dataclass(frozen=True)
class MeshTopology:
    """What the engine needs from MediaPipe's canonical face, computed once.

    triangles: [T,3] int32 (front faces counter-clockwise in model space); mirror: [468] int,
    each vertex's left/right twin; skin: [468] float in [0,1], 0 on eyes, brows and lips (the
    vertices whose shading says nothing about lighting); rim: [468] bool, the face-oval vertices
    (their texture in a photo is half background); hairline: [468] float in [0,1], 0 at the
    top of the forehead, 1 below it.
    """

    triangles: np.ndarray
    mirror: np.ndarray
    skin: np.ndarray
    rim: np.ndarray
    hairline: np.ndarray


@functools.lru_cache(maxsize=1)
def mesh_topology() -> MeshTopology:
    """The canonical mesh's triangles, mirror map and vertex classes (cached)."""
    vertices, triangles = canonical_face()
    features = list(topology.LEFT_EYE + topology.RIGHT_EYE + topology.LEFT_EYEBROW
                    + topology.RIGHT_EYEBROW + topology.LIPS_OUTER + topology.LIPS_INNER)
    dist = np.linalg.norm(vertices[:, None, :] - vertices[None, features, :], axis=2).min(1)
    skin = np.clip((dist - 0.3) / 0.5, 0.0, 1.0)  # cm from the nearest feature vertex
    rim = np.zeros(N, bool)
    rim[list(topology.FACE_OVAL)] = True
    # the top of the forehead is where hair falls in most photos: its texture fades out
    hairline = np.clip((FOREHEAD_TOP_CM - vertices[:, 1]) / FOREHEAD_FADE_CM, 0.0, 1.0)
    return MeshTopology(triangles, mesh.mirror_indices(vertices), skin, rim, hairline)


FOREHEAD_TOP_CM = 7.0  # canonical height (cm above the mesh origin) where forehead texture ends
FOREHEAD_FADE_CM = 2.0
CLOSED_MOUTH = 0.003  # mouth_opening below this: lips together
VALID_GAIN = 1.5  # alpha reaches 1 where two thirds of the texture weight is seen
@dataclass
class PreparedSource:
    """Everything about a source face that does not depend on the target, computed once.

    frame: the source face at working resolution (its own photo's background around it is
    never sampled); image: [h,w,3] float32 [0,255] of frame.image; vertex_weight: [468] float
    in [0,1], how well each vertex's texture is seen; shading: [468] float,
    the source photo's lighting at each vertex relative to its mean (spherical harmonics on the
    mesh normals); skin: the source's skin colour model (None if too little skin is seen);
    shape: [1404] its identity shape (``MediaPipeBackend.fit``), for shape transfer.
    """

    frame: WorkFrame
    image: np.ndarray
    vertex_weight: np.ndarray
    shading: np.ndarray
    skin: skin.SkinModel | None
    shape: np.ndarray


def _vertex_lighting(frame: WorkFrame, topo: MeshTopology
                     ) -> tuple[np.ndarray, np.ndarray, skin.SkinModel | None]:
    """(visibility per vertex [468], relative SH shading per vertex [468], skin colour model)
    of a face in its work frame."""
    lm = frame.face.landmarks[:N]
    vis = mesh.vertex_mean(mesh.triangle_visibility(lm, topo.triangles), topo.triangles, N)
    normals = mesh.vertex_normals(lm, topo.triangles)
    iod = frame.face.interocular
    lab = rgb_to_lab(frame.image.astype(np.float32))
    lab = cv2.GaussianBlur(lab, (0, 0), max(0.5, 0.04 * iod))
    values = sample(lab, lm[:, :2]).astype(np.float64)  # [468,3]
    weights = vis * topo.skin * ~topo.rim
    coef = fit_sh(normals, values[:, 0], weights)
    model = skin.fit_skin_model(values, weights * (topo.skin > 0.99))
    return vis, relative_shading(normals, coef, weights), model


@dataclass
class GeometricSwapper:
    """Swaps one source face onto target faces by a 3D-aware mesh texture transfer.

    blend: ``laplacian`` (multi-band, default), ``poisson`` (gradient domain) or ``alpha``.
    feather: width of the mask's soft edge, as a fraction of the inter-ocular distance.
    grow: how far the mask reaches past the face oval before feathering (same units).
    shading: relight the source texture with the target's lighting (spherical harmonics).
    tone_sigma: reach of the region-wise tone match (brightness follows the target's over
        this fraction of the inter-ocular distance; colour over 0.2 of it).
    keep_mouth_interior: the target's own mouth interior (teeth, tongue) is kept ``always``
        (default: a "mouth mask"; the lips around it are the source's), only when the target's
        mouth is wide open (``auto``), or ``never``.
    keep_eyes: ``never``: the source's eyes with their irises moved to where the target's are
        (the target's gaze); ``always``: the target's eye openings (eyes, gaze, blinks);
        ``auto`` (default): the source's unless its eyes are much less open than the
        target's (a blink, a downward look), which would otherwise close the target's eyes.
    skin_check: source texture on the skin that does not match the source's skin colour
        model (hair over the forehead, a hat brim, glasses frames) is not used.
    auto_occluders: keep target pixels on the skin that do not match the target's skin
        colour model (its glasses, hair, a hand).
    occlusion_mask: [H,W] bool/uint8 of the target photo, nonzero where the target must stay
        (hands, glasses, hair over the face); None for none.
    shape_transfer: 1 (default) moves the target's face outline to the source's face shape
        (source shape under the target's pose and expression), warping the target's
        surroundings smoothly; 0 keeps the target's outline; values between move it part of
        the way. On by default since the outline is a large part of what a recognizer sees:
        on our 72 distinct pairs it raised the share closer to the source from 75% to 83%.
    domain: ``photo``, ``stylized`` (a drawn or animated target: the inserted face takes its
        flat colour areas and palette) or ``auto`` (stylized when the target face's flat-colour
        score says so; see faces.style).
    work_iod: inter-ocular distance, in pixels, at which all the work is done (faces larger
        than this are processed downscaled; smaller ones at their own size).
    """

    name = "geometric"
    digital_source_type = COMPOSITE_SYNTHETIC  # a composite of real photos, no trained generator
    blend: str = "laplacian"
    feather: float = 0.1
    grow: float = 0.15
    shading: bool = False
    tone_sigma: float = 1.0
    shading_strength: float = 0.5
    keep_mouth_interior: str = "always"
    keep_eyes: str = "auto"
    skin_check: bool = True
    auto_occluders: bool = False
    occlusion_mask: np.ndarray | None = None
    work_iod: float = 128.0
    shape_transfer: float = 1.0
    domain: str = "auto"
    stats: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.keep_eyes not in ("auto", "always", "never"):
            raise ValueError("keep_eyes must be auto, always or never")
        if self.keep_mouth_interior not in ("auto", "always", "never"):
            raise ValueError("keep_mouth_interior must be auto, always or never")
        if self.blend not in BLENDS:
            raise ValueError(f"unknown blend {self.blend!r}; choose from {BLENDS}")
        if self.domain not in DOMAINS:
            raise ValueError(f"unknown domain {self.domain!r}; choose from {DOMAINS}")
        if not 0.0 <= self.shape_transfer <= 1.0:
            raise ValueError(f"shape_transfer must be in [0, 1], got {self.shape_transfer}")
        if not self.work_iod >= 16:
            raise ValueError(f"work_iod must be at least 16 pixels, got {self.work_iod}")

    def prepare_source(self, source: np.ndarray, source_face: FaceRecord) -> PreparedSource:
        """The per-source half of a swap, to reuse across many targets or video frames.

        source: [H,W,3] uint8 photo; source_face: its face in photo pixels.
        """
        box = source_face.box
        margin = 0.1 * float(max(box[2] - box[0], box[3] - box[1])) + 4
        frame = work_frame(source, source_face, margin, 1.25 * self.work_iod)
        vis, shade, model = _vertex_lighting(frame, mesh_topology())
        # vertices beyond the photo's edge (a face cut by the frame) show only padding
        x0, y0, x1, y1 = frame.roi
        inside = np.ones(N, bool)
        pts = source_face.points[:N]
        inside &= (pts[:, 0] >= x0 + 1) & (pts[:, 0] <= x1 - 2)
        inside &= (pts[:, 1] >= y0 + 1) & (pts[:, 1] <= y1 - 2)
        inside &= (pts[:, 0] >= 1) & (pts[:, 0] <= source.shape[1] - 2)
        inside &= (pts[:, 1] >= 1) & (pts[:, 1] <= source.shape[0] - 2)
        topo = mesh_topology()
        vis = vis * inside * topo.hairline
        return PreparedSource(frame, frame.image.astype(np.float32), vis, shade, model,
                              reshape.backend().fit(None, frame.face).shape)

    def swap_one(self, target: np.ndarray, target_face: FaceRecord,
                 source: np.ndarray | PreparedSource, source_face: FaceRecord | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
        """Swap the source identity onto one target face.

        target: [H,W,3] uint8; source: [h,w,3] uint8 with ``source_face`` (faces in their
        photos' pixels), or a ``PreparedSource``. Returns (image [H,W,3] uint8, alpha [H,W]
        float32 in [0,1]); image equals target exactly wherever alpha == 0.
        """
        if not isinstance(source, PreparedSource):
            if source_face is None:
                raise ValueError("a source photo needs its source_face")
            source = self.prepare_source(source, source_face)
        topo = mesh_topology()
        iod = target_face.interocular
        reach = (self.grow + self.feather + 0.1 + (0.5 if self.shape_transfer else 0.0)) * iod
        frame = work_frame(target, target_face, reach + 8, self.work_iod)
        if self.shape_transfer > 0:
            frame, moved = self._reshape(frame, source)
            # the texture, tone and blend work only on the part of the frame the face's mask
            # can reach (as without shape transfer); the wider margin holds warped
            # surroundings only. The warped surroundings are part of the change.
            fg, alpha = self._render_inside(frame, source, topo, reach - 0.5 * iod)
            alpha = np.maximum(alpha, moved)
        else:
            fg, alpha, _ = self._render(frame, source, topo)
        x0, y0, x1, y1 = frame.roi
        if self.occlusion_mask is not None:
            if np.asarray(self.occlusion_mask).shape[:2] != target.shape[:2]:
                raise InputError(
                    f"the occlusion mask is {np.asarray(self.occlusion_mask).shape[:2]} pixels "
                    f"(rows, columns) but the target photo is {target.shape[:2]}: pass a mask "
                    f"of the target's size")
            alpha = alpha * (1.0 - self._occlusion(frame))
        fg = np.clip(fg + 0.5, 0, 255).astype(np.uint8)
        # only the part where alpha > 0 is resampled to photo pixels and composited
        ys, xs = np.nonzero(alpha > 0)
        out = target.copy()
        full_alpha = np.zeros(target.shape[:2], np.float32)
        if len(xs) == 0:
            return out, full_alpha
        a0, b0 = xs.min(), ys.min()
        a1, b1 = xs.max() + 1, ys.max() + 1
        if frame.scale < 1.0:
            # photo pixel p maps to work pixel (p - x0 + 0.5) * s - 0.5; take every photo pixel
            # whose work position lies in the box, plus one of slack for the interpolation
            sx = fg.shape[1] / (x1 - x0)
            sy = fg.shape[0] / (y1 - y0)
            px0 = max(x0, int(np.floor(x0 + (a0 - 1 + 0.5) / sx - 0.5)))
            px1 = min(x1, int(np.ceil(x0 + (a1 + 0.5) / sx - 0.5)) + 1)
            py0 = max(y0, int(np.floor(y0 + (b0 - 1 + 0.5) / sy - 0.5)))
            py1 = min(y1, int(np.ceil(y0 + (b1 + 0.5) / sy - 0.5)) + 1)
            # the same map cv2.resize uses for the whole ROI, restricted to the box
            gx = ((np.arange(px0, px1) - x0 + 0.5) * sx - 0.5).astype(np.float32)
            gy = ((np.arange(py0, py1) - y0 + 0.5) * sy - 0.5).astype(np.float32)
            map_x = np.broadcast_to(gx[None, :], (len(gy), len(gx)))
            map_y = np.broadcast_to(gy[:, None], (len(gy), len(gx)))
            fg = cv2.remap(fg, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
            alpha = cv2.remap(alpha, map_x, map_y, cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        else:
            px0, py0, px1, py1 = x0 + a0, y0 + b0, x0 + a1, y0 + b1
            fg, alpha = fg[b0:b1, a0:a1], alpha[b0:b1, a0:a1]
        alpha = np.clip(alpha, 0.0, 1.0)
        out[py0:py1, px0:px1] = composite(fg, target[py0:py1, px0:px1], alpha)
        full_alpha[py0:py1, px0:px1] = alpha
        return out, full_alpha

    def _render(self, frame: WorkFrame, source: PreparedSource, topo: MeshTopology
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The swapped face in the work frame: (blended [h,w,3] float32 [0,255], alpha [h,w]
        float32 in [0,1], hard mask [h,w] uint8)."""
        face = frame.face
        h, w = frame.image.shape[:2]
        iod = face.interocular
        tri = topo.triangles
        lm = face.landmarks[:N]
        index = mesh.raster_index(lm[:, :2], tri, (h, w), depth=lm[:, 2])
        src_pts = source.frame.face.points[:N].astype(np.float64)
        mirror = topo.mirror
        t_shade, t_skin = np.ones(N), None
        if self.shading or self.auto_occluders:
            _, t_shade, t_skin = _vertex_lighting(frame, topo)
        # per target vertex: where to sample directly and mirrored, how much each counts, and
        # the source lighting at the sampled vertex
        values = np.concatenate([
            src_pts, src_pts[mirror],
            source.vertex_weight[:, None], source.vertex_weight[mirror][:, None],
            source.shading[:, None], source.shading[mirror][:, None],
            t_shade[:, None], topo.skin[:, None], topo.hairline[:, None],
        ], axis=1)
        field_ = mesh.interpolate(lm[:, :2], tri, values, index)
        covered = index >= 0
        keep_eyes = self._keeps_eyes(face, source.frame.face)
        if not keep_eyes:
            align_irises(field_[..., 0:2], face, source.frame.face)
        direct = cv2.remap(source.image, field_[..., 0:2], None, cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REPLICATE)
        mirrored = cv2.remap(source.image, field_[..., 2:4], None, cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REPLICATE)
        # on skin, texture that is not the source's skin (hair, a hat brim, glasses frames)
        # does not count: the mirrored side or the target fills in
        zone = np.clip(field_[..., 9], 0.0, 1.0) * covered
        wd = np.clip(field_[..., 4], 0.0, 1.0)
        wm = np.clip(field_[..., 5], 0.0, 1.0)
        if self.skin_check:
            wd = wd * (1 - zone * (1 - skin.skin_likelihood(source.skin, rgb_to_lab(direct))))
            wm = wm * (1 - zone * (1 - skin.skin_likelihood(source.skin, rgb_to_lab(mirrored))))
        wm = wm * (1.0 - wd)
        valid = (wd + wm) * covered
        norm = np.maximum(wd + wm, 1e-6)
        target_f = frame.image.astype(np.float32)
        tex = (direct * wd[..., None] + mirrored * wm[..., None]) / norm[..., None]
        if self.shading:
            src_shade = (field_[..., 6] * wd + field_[..., 7] * wm) / norm
            ratio = np.clip(field_[..., 8] / np.maximum(src_shade, 1e-3), 0.5, 2.0)
            ratio = ratio ** self.shading_strength
            tex = np.clip(tex * ratio[..., None], 0, 255)
        tex = np.where(valid[..., None] > 1e-3, tex, target_f)
        oval = masks.region_mask(face.points, (h, w), ("face",))
        face_weight = masks.erode(oval, max(1, int(0.05 * iod))).astype(np.float32) / 255.0
        colored = transfer_color(tex, target_f, (valid * face_weight).astype(np.float32),
                                 face_weight, sigma_luma=self.tone_sigma * iod,
                                 sigma_chroma=0.2 * iod)
        if self.domain == "stylized" or (self.domain == "auto" and style.stylization_score(
                frame.image, face_weight > 0) >= style.STYLIZED_SCORE):
            colored = style.restyle(colored, target_f, face_weight > 0)
        hard = masks.dilate(oval, int(round(self.grow * iod)))
        alpha = masks.feather(hard, max(1, int(round(self.feather * iod))))
        alpha *= np.clip(valid * VALID_GAIN, 0.0, 1.0)  # the target where no texture is seen
        alpha *= np.clip(field_[..., 10], 0.0, 1.0)  # and at the top of its forehead
        if self.auto_occluders:
            # the target's own non-skin over its skin (glasses, hair, a hand) stays
            foreign = zone * (1 - skin.skin_likelihood(t_skin, rgb_to_lab(target_f)))
            sigma = max(0.5, 0.02 * iod)
            alpha *= 1.0 - np.clip(cv2.GaussianBlur(foreign, (0, 0), sigma) * 1.5, 0.0, 1.0)
        keep = self._keep_mask(face, (h, w), keep_eyes)
        if keep is not None:
            alpha *= 1.0 - keep
        if self.blend == "laplacian":
            blended = laplacian_blend(colored, target_f, alpha)
        elif self.blend == "poisson":
            inner = ((alpha > 0.5) * 255).astype(np.uint8)
            fg = np.clip(colored + 0.5, 0, 255).astype(np.uint8)
            blended = poisson_blend(fg, frame.image, inner)
        else:
            blended = colored
        return blended.astype(np.float32), alpha.astype(np.float32), hard

    def _render_inside(self, frame: WorkFrame, source: PreparedSource, topo: MeshTopology,
                       reach: float) -> tuple[np.ndarray, np.ndarray]:
        """``_render`` on the part of the frame within ``reach`` photo pixels (+ 8) of the face
        box: (image [h,w,3] float32 [0,255], the frame's own pixels outside that part; alpha
        [h,w] float32 in [0,1], 0 outside it)."""
        h, w = frame.image.shape[:2]
        margin = (reach + 8) * frame.scale
        bx0, by0, bx1, by1 = frame.face.box
        x0, y0 = int(max(0, np.floor(bx0 - margin))), int(max(0, np.floor(by0 - margin)))
        x1, y1 = int(min(w, np.ceil(bx1 + margin))), int(min(h, np.ceil(by1 + margin)))
        shift = np.array([[1.0, 0.0, -x0], [0.0, 1.0, -y0]])
        part = WorkFrame(frame.roi, frame.image[y0:y1, x0:x1],
                         frame.face.transformed(shift, (y1 - y0, x1 - x0)), frame.scale)
        fg_part, alpha_part, _ = self._render(part, source, topo)
        fg = frame.image.astype(np.float32)
        fg[y0:y1, x0:x1] = fg_part
        alpha = np.zeros((h, w), np.float32)
        alpha[y0:y1, x0:x1] = alpha_part
        return fg, alpha

    def _reshape(self, frame: WorkFrame, source: PreparedSource) -> tuple[WorkFrame, np.ndarray]:
        """Move the target's face outline toward the source's face shape, warping the target
        around it smoothly. Returns (the frame with the warped image and moved landmarks, the
        soft [h,w] float32 mask of pixels the warp moved by more than a fraction of a pixel)."""
        face = reshape.reshaped_face(frame.face, source.shape, self.shape_transfer)
        h, w = frame.image.shape[:2]
        iod = frame.face.interocular
        field = reshape.displacement_field(frame.face.points[:N].astype(np.float64),
                                   face.points[:N].astype(np.float64), (h, w), 0.3 * iod)
        # nothing moves at the frame's border, so the photo around it stays exact
        # (a ramp over the distance to the nearest edge, min(x, w-1-x, y, h-1-y): taken per
        # row and per column, then their minimum, with the same rounding as over the grid)
        ys, xs = np.arange(h)[:, None], np.arange(w)[None, :]
        fade = max(1.0, 0.1 * iod)
        ramp = np.minimum(np.clip(np.minimum(xs, w - 1 - xs) / fade, 0.0, 1.0),
                          np.clip(np.minimum(ys, h - 1 - ys) / fade, 0.0, 1.0))
        field *= ramp[..., None].astype(np.float32)
        map_x = (xs - field[..., 0]).astype(np.float32)
        map_y = (ys - field[..., 1]).astype(np.float32)
        image = cv2.remap(frame.image, map_x, map_y, cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)
        # |field| per pixel (np.linalg.norm(field, axis=2), the same float32 operations, a
        # fifth of the time: this runs on every video frame)
        length = np.sqrt(field[..., 0] * field[..., 0] + field[..., 1] * field[..., 1])
        moved = np.clip(length / 0.25, 0.0, 1.0).astype(np.float32)
        return WorkFrame(frame.roi, image, face, frame.scale), moved

    def _keeps_eyes(self, target: FaceRecord, source: FaceRecord) -> bool:
        """Whether the target's eye openings stay (see ``keep_eyes``)."""
        if self.keep_eyes != "auto":
            return self.keep_eyes == "always"
        return eye_opening(source) < max(0.12, 0.6 * eye_opening(target))

    def _keep_mask(self, face: FaceRecord, shape: tuple[int, int], keep_eyes: bool
                   ) -> np.ndarray | None:
        """Soft [h,w] float32 in [0,1] of the target parts kept: mouth interior, eyes."""
        regions = []
        # a closed mouth's inner-lip polygon is a sliver: keeping it would only punch holes
        opening = mouth_opening(face)
        keep_mouth = opening > CLOSED_MOUTH and (self.keep_mouth_interior == "always" or (
            self.keep_mouth_interior == "auto" and opening > OPEN_MOUTH))
        if keep_mouth:
            regions.append("mouth_inner")
        if keep_eyes:
            regions += ["left_eye", "right_eye"]
        if not regions:
            return None
        hard = masks.region_mask(face.points, shape, regions)
        if not hard.any():
            return None
        sigma = max(0.5, 0.03 * face.interocular)
        # grown a little then blurred: the whole opening stays the target's, the lid and lip
        # edges blend
        soft = cv2.GaussianBlur(masks.dilate(hard, max(1, int(sigma))).astype(np.float32) / 255.0,
                                (0, 0), sigma)
        return np.clip(soft, 0.0, 1.0)

    def _occlusion(self, frame: WorkFrame) -> np.ndarray:
        """The user's occlusion mask in the work frame, softened: [h,w] float32 in [0,1]."""
        x0, y0, x1, y1 = frame.roi
        occ = np.asarray(self.occlusion_mask)
        crop = (occ[y0:y1, x0:x1] > 0).astype(np.float32)
        h, w = frame.image.shape[:2]
        if crop.shape != (h, w):
            crop = cv2.resize(crop, (w, h), interpolation=cv2.INTER_AREA)
        sigma = max(0.5, 0.02 * frame.face.interocular)
        return np.clip(cv2.GaussianBlur(crop, (0, 0), sigma) * 1.5, 0.0, 1.0)

    def swap_pairs(self, target: np.ndarray, pairs: Sequence[tuple[FaceRecord, Source]]
                   ) -> tuple[np.ndarray, np.ndarray]:
        """The engine contract (``engines.base.SwapEngine``): each target face with its own
        source. Returns (image, union alpha) as swap_one.

        A source is prepared once and kept on its face record (``face.extras``), so a batch of
        photos or every frame of a video reuses it.
        """
        image = target
        alpha = np.zeros(target.shape[:2], np.float32)
        for face, source in pairs:
            image, a = self.swap_one(image, face, self.prepared(source))
            alpha = np.maximum(alpha, a)
        return image, alpha

    def prepared(self, source: Source) -> PreparedSource:
        """``prepare_source`` of a Source, cached on its face record. The key names this
        engine's working resolution and the face's landmarks (a record moved to another frame
        by ``FaceRecord.transformed`` copies its extras, and must not reuse them)."""
        face = source.face
        key = (f"geometric.prepared/{self.work_iod}/"
               f"{hashlib.blake2b(face.landmarks.tobytes(), digest_size=8).hexdigest()}/"
               f"{source.image.rgb.shape}")
        if key not in face.extras:
            face.extras[key] = self.prepare_source(source.image.rgb, face)
        return face.extras[key]

    def swap(self, target: np.ndarray, target_faces: list[FaceRecord],
             source: np.ndarray | PreparedSource, source_face: FaceRecord | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
        """Swap onto several target faces in turn. Returns (image, union alpha) as swap_one."""
        if not isinstance(source, PreparedSource):
            source = self.prepare_source(source, source_face)
        image = target
        alpha = np.zeros(target.shape[:2], np.float32)
        for face in target_faces:
            image, a = self.swap_one(image, face, source)
            alpha = np.maximum(alpha, a)
        return image, alpha
