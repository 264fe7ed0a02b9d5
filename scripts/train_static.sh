#!/usr/bin/env bash
# Static-graph training: PLSC v2.2's train_static.sh for plsc. Static mode is not implemented yet; once it
# is, this script takes the same arguments and environment as scripts/train_dynamic.sh and adds
# --set train.mode=static.
echo "train_static.sh: static-graph training is not implemented yet; use scripts/train_dynamic.sh" >&2
exit 2
