""" Tools behind the commands: the script engine, data, visualisation, benchmarking, profiling. """
