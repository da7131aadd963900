"""The method document ships with moegrok (package data, installed as moegrok.docs): reports copy METHOD.md into
the run directory and link it there (moegrok.rundir.method_link)."""
