# The Prefect runtime image plus the test flows, so deployments need no pull step.
FROM local/prefect:3.9.1
COPY flows.py /opt/flows/flows.py
WORKDIR /opt/flows
