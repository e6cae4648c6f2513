#!/usr/bin/env bash
# A stand-in for `sbatch` in the tests: runs Snakemake's job script as a separate background process and prints
# its process id as the job id. Snakemake learns that a job ended from the marker files its job script writes.
jobscript="${@: -1}"
nohup bash "$jobscript" > "$jobscript.log" 2>&1 &
echo "$!"
