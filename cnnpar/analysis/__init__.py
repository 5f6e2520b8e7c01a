"""Analysis of run logs: Table I (`cnnpar table`), figures (`cnnpar plots`), the controlled experiments'
report (`cnnpar explain`) and the accuracy map's report (`cnnpar report`)."""
