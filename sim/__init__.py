"""The simulator: a simpy engine that runs a Plan on modelled devices and links and
emits a Trace.  Never imports the executor."""
