"""The independent recognizers that score identity live in ``faces.recognizer`` (the swapper's
reference face selection uses them too, and sits below eval); eval imports them from here."""

from diffswap_igfi.faces.recognizer import (SAME_PERSON_DISTANCE, DlibRecognizer,  # noqa: F401
                                            FaceRecognizer)
