"""The batch job on Ray Data: stages, driver, jobs, resume, the nightly job and its report."""
