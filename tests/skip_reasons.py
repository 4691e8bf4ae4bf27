"""Skip messages that name the install command the README gives (one place for every test)."""

LEROBOT_MISSING = ('LeRobot not installed (pip install --no-deps "lerobot==0.3.3": the README\'s '
                   "Set-up section; the packages it imports come with the dev extra)")

LEROBOT_INCOMPLETE = "LeRobot is installed, but not what it imports: {error}"

RAY_MISSING = 'ray not installed (the cluster extra: pip install "qc-robot[cluster]")'
