"""``ray job submit`` entrypoints: ``python -m jobs.<command> --config jobs/configs/<command>.yaml``.

Each module runs one ``wclip`` command from a YAML config whose keys are that command's flags
(see :mod:`jobs._config`); they hold no logic of their own. On a cluster the job attaches to Ray
through ``RAY_ADDRESS``, which ``ray job submit`` sets.
"""
