"""torch.library custom ops (torch.ops.lorart.*) over lorart._C, one lorart.ops._define.Op each.

One module per capability; importing this package registers every op (lorart.ops._define.REGISTRY).
"""
from . import nf4  # noqa: F401
from . import lora  # noqa: F401
from . import lora_extra  # noqa: F401
from . import optim  # noqa: F401
from . import loss  # noqa: F401
from . import act  # noqa: F401
from . import norm  # noqa: F401
