"""The Ray + MLflow side of vtrans: the command line now; the stage DAG, Train jobs and sweeps to come."""
