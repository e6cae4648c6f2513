#!/usr/bin/env bash
# A stand-in for `sbatch` in the tests: runs Snakemake's job script as a separate background process and prints
# its process id as the job id. Snakemake learns that a job ended from the marker files its job script writes.
# With TOKENCLEAN_SUBMIT_LOG set, each submitted job script's name is appended to that file.
jobscript="${@: -1}"
if [ -n "${TOKENCLEAN_SUBMIT_LOG:-}" ]; then
    basename "$jobscript" >> "$TOKENCLEAN_SUBMIT_LOG"
fi
nohup bash "$jobscript" > "$jobscript.log" 2>&1 &
echo "$!"
