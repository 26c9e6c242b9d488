"""clustersim's simulator: topology, models, partitioning into a Plan, and a simpy engine
that predicts how fast the partitioned network trains."""
