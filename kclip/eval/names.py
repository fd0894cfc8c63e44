"""The task names of `kclip eval` and the attribute sets it reads, torch-free for the command line's parser."""

TASKS: tuple[str, ...] = ("retrieval", "zeroshot", "attributes", "text-em")
ATTRIBUTE_SETS: tuple[str, ...] = ("awa2", "cub")
