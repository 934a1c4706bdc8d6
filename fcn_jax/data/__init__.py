"""Input pipelines and data set builders."""
