"""emolens: find, read and steer the emotion representations inside language models.

    model = emolens.load_model()                   # embedded SmolLM2-135M-Instruct, offline
    bank = emolens.build(model)                    # 171 emotion vectors, cached
    scores = emolens.read(model, bank, messages)   # tokens x emotions
    with emolens.steer(model, bank, {"calm": 0.05}):
        model.model.generate(...)

The names below are functions: `emolens.read` is the function, `emolens.read.read` is not.
Import submodules with `from emolens.read import ...`.
"""

__version__ = "0.1.0"

from emolens.bank import EmotionBank  # noqa: E402
from emolens.build import build  # noqa: E402
from emolens.models import load_model, wrap_model  # noqa: E402
from emolens.read import generate, read  # noqa: E402
from emolens.steer import steer  # noqa: E402

__all__ = ["EmotionBank", "build", "generate", "load_model", "read", "steer", "wrap_model"]
