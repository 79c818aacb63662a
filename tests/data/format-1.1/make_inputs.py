"""The inputs of the format-1.1 fixture (README.md here): run from the repository root, once, with vqpipe 0.1.0."""

import sys

sys.path.insert(0, "tests")
from shards import corrupt_jpeg_bytes, good_image_bytes, write_not_a_tar, write_shard  # noqa: E402


def samples(prefix: str, n: int, seed: int, bad: bool = False) -> list[dict]:
    out = []
    for i in range(n):
        fmt = "jpg" if i % 2 else "png"
        out.append(
            {
                "__key__": f"{prefix}/{i:03d}",
                fmt: good_image_bytes(seed * 100 + i, fmt=fmt),
                "cls": str(i % 3),
            }
        )
    if bad:
        out.append({"__key__": f"{prefix}/bad", "jpg": corrupt_jpeg_bytes(seed)})
    return out


write_shard("/tmp/vqfx/in/part-000000.tar", samples("p0", 5, 1))
write_shard("/tmp/vqfx/in/part-000001.tar", samples("p1", 4, 2, bad=True))
write_shard("/tmp/vqfx/in/part-000002.tar", samples("p2", 3, 3))
write_not_a_tar("/tmp/vqfx/in/part-000003.tar")
# added before the second run:
write_shard(
    "/tmp/vqfx/in/part-000004.tar",
    [{"__key__": f"p4/{i:03d}", "png": good_image_bytes(400 + i, fmt="png")} for i in range(3)],
)
write_shard(
    "/tmp/vqfx/in/part-000005.tar",
    [{"__key__": f"p5/{i:03d}", "jpg": good_image_bytes(500 + i)} for i in range(2)],
)
