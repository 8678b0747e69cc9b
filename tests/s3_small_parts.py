"""``cmv`` with multipart parts smaller than S3's 5 MiB minimum, so the tiny recipe's small files go up
in several parts (the loopback server is started with ``S3_UPLOAD_PART_MIN_SIZE`` lowered to match).

    python tests/s3_small_parts.py clean --input ... --output s3://...

boto3's transfer manager raises any part size to 5 MiB (s3transfer's ``ChunksizeAdjuster``); only that
floor is lowered here, the stage then runs as ``cmv`` does with ``CMV_S3_PART_BYTES`` as its part size.
"""

import sys

from s3transfer import utils

_defaults = list(utils.ChunksizeAdjuster.__init__.__defaults__)
_defaults[1] = 1024  # min_size
utils.ChunksizeAdjuster.__init__.__defaults__ = tuple(_defaults)

from cmv_core.cli import main  # noqa: E402

sys.exit(main())
