"""Where the SFI pipeline's encoders were defined before they moved to ``conditions``; kept so
pipeline folders saved with these module paths in ``model_index.json`` still load."""

from diffswap_igfi.conditions.clip import ClipVisionEncoderModel  # noqa: F401
from diffswap_igfi.conditions.identity import ArcFaceEncoderModel  # noqa: F401
from diffswap_igfi.conditions.tensors import to_tensor, to_uint8  # noqa: F401
