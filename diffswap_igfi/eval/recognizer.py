"""The independent recognizers that score identity live in ``faces.recognizer`` (the swapper's
reference face selection uses them too, and sits below eval); eval imports them from here."""

from diffswap_igfi.faces.recognizer import (  # noqa: F401
    SAME_PERSON_DISTANCE,
    DlibRecognizer,
    FaceRecognizer,
)
