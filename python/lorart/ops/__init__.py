"""torch.library custom ops (torch.ops.lorart.*) over lorart._C.

One module per capability; importing this package registers every op.
"""
from . import _common  # noqa: F401
from . import nf4  # noqa: F401,E402
from . import lora  # noqa: F401
from . import optim  # noqa: F401
from . import loss  # noqa: F401
from . import act  # noqa: F401
from . import norm  # noqa: F401
