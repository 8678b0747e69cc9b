"""The loopback S3 server (moto) in its own process, answering an UploadPart to a multipart upload it
does not know as S3 does (404 NoSuchUpload; moto 5.2 answers 500), so a store restarted without its
state is seen by the stage as it would be on S3.

    python tests/moto_s3_server.py -H 127.0.0.1 -p PORT
"""

import sys

from moto.s3 import models
from moto.s3.exceptions import NoSuchUpload
from moto.server import main

_upload_part = models.S3Backend.upload_part


def upload_part(self, bucket_name, multipart_id, part_id, value):
    if multipart_id not in self.get_bucket(bucket_name).multiparts:
        raise NoSuchUpload(upload_id=multipart_id)
    return _upload_part(self, bucket_name, multipart_id, part_id, value)


models.S3Backend.upload_part = upload_part

sys.exit(main(sys.argv[1:]))
