"""Configuration: flags > environment > TOML file > defaults, built once per process.

`settings` holds the model, `registry` lists its keys, `loading` builds it (and the
argparse flags), `files` finds and reads the TOML file, `values` parses and explains
values, `template` renders the default file and the effective configuration.
"""
